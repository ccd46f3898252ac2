"""SparseLoRACallback with transformers.Trainer: warm-up schedule from global_step/max_steps, logging, and the
running FFN scores a checkpoint keeps (resume through `finetune`: test_cli.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import sparselora
from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora

from sparselora.patch import get_state

from helpers import make_batch, tiny_peft


class Batches(Dataset):
    def __init__(self, n=16):
        b = make_batch(batch=n, lengths=(24, 20, 14, 9), labelled=(3, 4, 2, 5), seed=1)
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class Spy(SparseLoRACallback):
    def __init__(self):
        super().__init__()
        self.active = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        super().on_step_begin(args, state, control, model=model, **kw)
        self.active.append(sparselora.patch.get_state(model).active)


def make_trainer(tmp_path, model, callback, max_steps=10, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0, **kw,
    )
    return Trainer(model=model, args=args, train_dataset=Batches(), data_collator=collate, callbacks=[callback])


def test_trainer_warmup_then_sparse(tmp_path):
    model = tiny_peft()
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.8, 2: 0.8}, attn_sparsity={2: 0.5}, start_step=0.3))
    spy = Spy()
    trainer = make_trainer(tmp_path, model, spy)
    trainer.train()
    assert spy.active == [False] * 3 + [True] * 7  # round(0.3 * 10) = 3 dense warm-up steps
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert [h["sparselora/active"] for h in logged] == [0.0, 1.0, 1.0, 1.0, 1.0]  # logged at steps 2, 4, ..., 10
    assert sparselora.kept_channels(model)[1]["ffn"].numel() == round(0.2 * 86)


def test_resumed_run_keeps_schedule(tmp_path):
    model = tiny_peft()
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.8}, start_step=0.5))
    spy = Spy()
    trainer = make_trainer(tmp_path, model, spy, max_steps=8)
    trainer.state.global_step, trainer.state.max_steps = 4, 8  # as a resumed run would be
    spy.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    assert sparselora.patch.get_state(model).active  # step 4 of 8 with start 0.5: sparse
    trainer.state.global_step = 3
    spy.on_step_begin(trainer.args, trainer.state, trainer.control, model=model)
    assert not sparselora.patch.get_state(model).active


def test_gradient_accumulation_dense_equals_larger_batch(tmp_path):
    """With sparsity off, 2 x 2 accumulated micro-batches give the same update as one batch of 4."""
    results = []
    for bs, acc in ((4, 1), (2, 2)):
        model = tiny_peft()
        apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={1: 0.8}, start_step=0))
        sparselora.set_enabled(model, False)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{bs}"), max_steps=2, per_device_train_batch_size=bs,
            gradient_accumulation_steps=acc, learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
            seed=0, average_tokens_across_devices=False,
        )
        rows = Batches(8)
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[SparseLoRACallback()]).train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-4, atol=1e-5)


def test_saved_running_scores_of_another_config_are_refused():
    model = tiny_peft("llama")
    apply_sparselora(model, SparseLoRAConfig(ffn_sparsity={"0-1": 0.9}, start_step=0))
    state = get_state(model)
    with pytest.raises(ValueError, match="another sparsity config"):
        state.load_running_scores({"ffn.3": torch.ones(8)}, "cpu")
    state.load_running_scores({"ffn.1": torch.arange(4.0)}, "cpu")  # continues in place of an empty average
    assert state.running_scores_state().keys() == {"ffn.1"} and state.running_scores[1].running.tolist() == [0, 1, 2, 3]
