"""SparseLoRA inside trainers: transformers.Trainer, TRL's SFTTrainer (completion-only loss, padding-free),
gradient checkpointing, and packed rows (position_ids, no attention_mask, several segments per row)."""

from __future__ import annotations

import logging

import pytest
import torch

import sparselora
from sparselora import SparseLoRACallback, SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.patch import get_state

from helpers import assert_close, clone, lora_grads, make_batch, tiny_peft
from test_data import tiny_tokenizer

CFG = dict(ffn_sparsity={"1-2": 0.75}, attn_sparsity={"2": 0.5}, start_step=0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _record_splits(model):
    """Every sparse split the model makes (context count and shape), via a forward hook after the pre-hook."""
    seen = []
    hf = sparselora.models.causal_lm(model)

    def hook(module, args, kwargs):
        st = get_state(model)
        seen.append(None if st.split is None else (st.split.num_context, st.split.shape))

    # registered after apply_sparselora's pre-hook, so it runs after the split is made
    hf.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _rows(n=8):
    return [{"prompt": f"Question {i}: what is {i} times {i + 3}? Think.", "completion": f" {i * (i + 3)}"}
            for i in range(n)]


def test_hf_trainer_with_callback_runs_sparse(tmp_path):
    from transformers import Trainer, TrainingArguments

    from sparselora.data import DataCollator, Example, tokenize_examples

    tok = tiny_tokenizer()
    model = tiny_peft("llama", vocab_size=len(tok), r=4)
    apply_sparselora(model, SparseLoRAConfig(**{**CFG, "start_step": 2}))  # a step count (<= 1 is a fraction)
    seen = _record_splits(model)
    feats, _ = tokenize_examples([Example(r["prompt"], r["completion"]) for r in _rows()], tok, max_length=128)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=DataCollator(tok),
                      callbacks=[SparseLoRACallback()])
    trainer.train()
    assert seen[:2] == [None, None] and seen[2] is not None  # steps 0 and 1 are the dense warm-up
    assert kept_channels(model)


@pytest.mark.parametrize("padding_free", [False, True])
def test_trl_sft_trainer_completion_only_loss_runs_sparse(tmp_path, padding_free, caplog):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = tiny_tokenizer()
    model = tiny_peft("llama", vocab_size=len(tok), r=4)
    apply_sparselora(model, SparseLoRAConfig(**CFG))
    seen = _record_splits(model)
    labels_seen = []
    hf = sparselora.models.causal_lm(model)
    hf.register_forward_pre_hook(lambda m, a, kw: labels_seen.append(kw.get("labels")), with_kwargs=True)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                         completion_only_loss=True, padding_free=padding_free, packing=padding_free,
                         max_length=128, bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows()),
                             processing_class=tok, callbacks=[SparseLoRACallback()])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    # TRL (1.x) passes `labels` (prompt positions -100) to the model's forward, so the split sees the context
    assert labels_seen and all(lbl is not None for lbl in labels_seen)
    assert all(s is not None for s in seen), "a training forward ran without a sparse split"
    for lbl, (n_ctx, shape) in zip(labels_seen, seen):
        assert tuple(lbl.shape) == shape
        assert 0 < n_ctx < lbl.numel()
        if padding_free:  # one packed row, no attention mask: context = every -100 position of the row
            assert shape[0] == 1 and n_ctx == int((lbl == -100).sum())
    assert kept_channels(model) and set(kept_channels(model)) == {1, 2}


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch(vocab=101)
    plain = tiny_peft("llama")
    apply_sparselora(plain, SparseLoRAConfig(**CFG))
    ckpt = clone(plain)  # same weights and adapters; apply state is per instance, so re-apply
    sparselora.remove_sparselora(ckpt)
    apply_sparselora(ckpt, SparseLoRAConfig(**CFG))
    for m in (plain, ckpt):
        m.train()
    ckpt.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    loss_a = plain(**batch).loss
    loss_a.backward()
    loss_b = ckpt(**batch).loss
    loss_b.backward()
    assert_close(loss_b.detach(), loss_a.detach(), "loss")
    ka, kb = kept_channels(plain), kept_channels(ckpt)
    assert set(ka) == set(kb) == {1, 2}
    for layer in ka:
        for name in ka[layer]:
            assert torch.equal(ka[layer][name], kb[layer][name]), (layer, name)
    ga, gb = lora_grads(plain), lora_grads(ckpt)
    assert set(ga) == set(gb) and ga
    for name in ga:
        assert_close(gb[name], ga[name], name)


def test_packed_row_splits_context_per_segment():
    """Padding-free packing: one row, position_ids restarting per segment, no attention_mask. The split is per
    token: the context rows are exactly the prompt positions of every segment, and the sparse forward equals
    the same row with an explicit all-ones mask. (transformers isolates packed segments only with flash
    attention; with eager/SDPA they attend across, dense or sparse alike.)"""
    model = tiny_peft("llama", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    apply_sparselora(model, SparseLoRAConfig(**CFG))
    g = torch.Generator().manual_seed(3)
    lens, labelled = (13, 9), (4, 3)
    segs = [torch.randint(1, 101, (n,), generator=g) for n in lens]
    labs = []
    for s, k in zip(segs, labelled):
        lab = torch.full_like(s, -100)
        lab[-k:] = s[-k:]
        labs.append(lab)
    packed = {
        "input_ids": torch.cat(segs)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
        "labels": torch.cat(labs)[None],
    }
    out_p = model(**packed)
    split = get_state(model).split
    prompt_pos = [i for i, v in enumerate(packed["labels"][0].tolist()) if v == -100]
    assert split.shape == (1, sum(lens)) and split.ctx.tolist() == prompt_pos
    assert prompt_pos == list(range(9)) + list(range(13, 19))  # both segments' prompts, nothing else
    kept_p = {k: {n: v.clone() for n, v in e.items()} for k, e in kept_channels(model).items()}
    out_p.loss.backward()
    assert all(torch.isfinite(gr).all() for gr in lora_grads(model).values())
    with torch.no_grad():
        out_m = model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    kept_m = kept_channels(model)
    assert set(kept_p) == {1, 2}
    for layer in kept_p:
        for name in kept_p[layer]:
            assert torch.equal(kept_p[layer][name], kept_m[layer][name]), (layer, name)
    assert_close(out_p.logits.detach(), out_m.logits, "packed logits")


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_cuda_graph_trainer_matches_trainer(tmp_path, grad_accum):
    """CUDAGraphTrainer (its eager path here, without CUDA) logs the losses and ends with the adapter weights of
    the plain Trainer, through the dense warm-up and the sparse steps, with and without gradient accumulation."""
    from transformers import Trainer, TrainingArguments

    from sparselora import CUDAGraphTrainer
    from sparselora.data import DataCollator, Example, tokenize_examples

    tok = tiny_tokenizer()
    base = tiny_peft("llama", vocab_size=len(tok), r=4)
    feats, _ = tokenize_examples([Example(r["prompt"], r["completion"]) for r in _rows(16)], tok, max_length=128)
    runs = {}
    for cls in (Trainer, CUDAGraphTrainer):
        model = clone(base)
        apply_sparselora(model, SparseLoRAConfig(**{**CFG, "start_step": 2}), fast_kernels=True)
        args = TrainingArguments(output_dir=str(tmp_path / cls.__name__), max_steps=4, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=grad_accum, learning_rate=1e-2, report_to=[],
                                 use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                                 remove_unused_columns=False, seed=0, data_seed=0)
        exact = {} if cls is Trainer else {"graph_bucket": 1}  # exact counts, as the plain Trainer's split
        trainer = cls(model=model, args=args, train_dataset=feats, data_collator=DataCollator(tok),
                      callbacks=[SparseLoRACallback()], **exact)
        if cls is Trainer:  # micro-batches weigh the same in the graph trainer: compare with that Trainer mode
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[cls.__name__] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (la, wa), (lb, wb) = runs["Trainer"], runs["CUDAGraphTrainer"]
    assert len(la) == len(lb) == 4
    assert_close(torch.tensor(lb), torch.tensor(la), "logged losses", torch.float32)
    for n in wa:
        assert_close(wb[n], wa[n], f"weight {n}", torch.float32)


def test_cuda_graph_trainer_refuses_what_it_cannot_capture(tmp_path):
    from transformers import TrainingArguments

    from sparselora import CUDAGraphTrainer
    from sparselora.data import DataCollator, Example, tokenize_examples

    tok = tiny_tokenizer()
    model = tiny_peft("llama", vocab_size=len(tok), r=4)
    apply_sparselora(model, SparseLoRAConfig(**CFG), fast_kernels=True)
    feats, _ = tokenize_examples([Example(r["prompt"], r["completion"]) for r in _rows(4)], tok, max_length=128)

    def trainer(collator, **kw):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False, **kw)
        return CUDAGraphTrainer(model=model, args=args, train_dataset=feats, data_collator=collator)

    with pytest.raises(ValueError, match="does not capture gradient checkpointing"):
        trainer(DataCollator(tok), gradient_checkpointing=True).train()

    def with_extra(features):
        batch = DataCollator(tok)(features)
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        return batch

    with pytest.raises(ValueError, match=r"also gave \['token_type_ids'\]"):
        trainer(with_extra).train()


@pytest.mark.parametrize("graph_trainer", [False, True])
def test_bf16_trainer_runs_the_fused_ops(tmp_path, monkeypatch, graph_trainer):
    """Trainer(bf16=True) wraps the forward in autocast (accelerate); the fused projections and FFN must still run
    there (they once stepped aside under autocast, so every Trainer run on a GPU took the unfused path), and
    every step's loss must stay close to the float32 run."""
    from transformers import Trainer, TrainingArguments

    import sparselora.ops.fused as fused
    from sparselora.bench.lora import QKVO
    from sparselora.trainer import CUDAGraphTrainer

    calls = {"proj": 0, "ffn": 0}
    for name, fn in (("proj", fused._SplitLoRALinear), ("ffn", fused._SplitFFN)):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    batches = [make_batch(seed=s) for s in range(3)]
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    losses = {}
    for bf16 in (False, True):
        # as on a GPU: a bf16 base with float32 adapters (PEFT's default) under bf16 autocast
        model = tiny_peft("llama", dtype=torch.bfloat16 if bf16 else torch.float32, targets=QKVO, r=4)
        apply_sparselora(model, SparseLoRAConfig(**CFG), fast_kernels=True)
        args = TrainingArguments(output_dir=str(tmp_path / str(bf16)), max_steps=3, report_to=[], use_cpu=True,
                                 per_device_train_batch_size=batches[0]["input_ids"].shape[0], bf16=bf16,
                                 logging_steps=1, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                                 learning_rate=1e-3)
        cls = CUDAGraphTrainer if graph_trainer else Trainer
        calls.update(proj=0, ffn=0)
        trainer = cls(model=model, args=args, train_dataset=rows, callbacks=[SparseLoRACallback()])
        trainer.train()
        assert calls["proj"] > 0 and calls["ffn"] > 0, f"bf16={bf16}: fused ops not used: {calls}"
        losses[bf16] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses[True]) == 3
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 0.03 * abs(b), f"bf16 autocast loss {a} vs float32 {b}"


def test_graph_trainer_step_takes_its_counts_from_the_host(tmp_path, monkeypatch):
    """The collator's host-side token counts reach the graphed step, which then counts nothing itself (on a GPU
    that count was a device sync per step), and the trained weights equal those of a step that counts itself."""
    from transformers import TrainingArguments

    import sparselora.graphs as graphs
    from sparselora import CUDAGraphTrainer
    from sparselora.data import DataCollator, Example, tokenize_examples
    from sparselora.graphs import COUNTS_KEY
    from sparselora.trainer import HostCounts

    tok = tiny_tokenizer()
    base = tiny_peft("llama", vocab_size=len(tok), r=4)
    feats, _ = tokenize_examples([Example(r["prompt"], r["completion"]) for r in _rows(8)], tok, max_length=128)
    batch = HostCounts(DataCollator(tok), True)(feats[:2])
    assert batch[COUNTS_KEY] == graphs.batch_counts(batch["labels"], batch["attention_mask"])
    in_step = []
    real = graphs.batch_counts
    monkeypatch.setattr(graphs, "batch_counts", lambda *a, **k: in_step.append(1) or real(*a, **k))
    weights = {}
    for host in (True, False):
        model = clone(base)
        apply_sparselora(model, SparseLoRAConfig(**CFG), fast_kernels=True)
        args = TrainingArguments(output_dir=str(tmp_path / str(host)), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True, remove_unused_columns=False, seed=0, data_seed=0)
        trainer = CUDAGraphTrainer(model=model, args=args, train_dataset=feats, data_collator=DataCollator(tok),
                                   graph_bucket=1)
        assert isinstance(trainer.data_collator, HostCounts)
        if not host:  # a collator that brings no counts: the step counts them itself
            trainer.data_collator = trainer.data_collator.collator
        in_step.clear()
        trainer.train()
        assert len(in_step) == (0 if host else 3), f"host counts {host}: the step counted {len(in_step)} times"
        weights[host] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for n in weights[True]:
        assert_close(weights[True][n], weights[False][n], f"weight {n}", torch.float32)


def test_token_counter_reads_the_host_counts():
    """finetune's per-step token count takes the host counts when the batch brings them (reading the GPU mask was
    two device syncs per step), and still warns on a batch without a labelled token."""
    from sparselora.graphs import COUNTS_KEY, BatchCounts
    from sparselora.run.callbacks import TokenCounter

    c = TokenCounter()
    never = type("Never", (), {"sum": lambda self: 1 / 0, "__getitem__": lambda self, k: 1 / 0})()
    c.add({COUNTS_KEY: BatchCounts(5, 3, 3, False, 9), "attention_mask": never, "labels": never})
    c.add({COUNTS_KEY: BatchCounts(4, 0, 0, True, 4), "attention_mask": never, "labels": never})
    assert (c.tokens, c.unlabelled_batches) == (13, 1)
    c.add({"attention_mask": torch.ones(2, 3, dtype=torch.long), "labels": torch.full((2, 3), -100)})
    assert (c.tokens, c.unlabelled_batches) == (19, 2)


def test_step_clock_times_begin_to_begin(monkeypatch):
    """A step's time runs from its begin to the next step's (what happens between steps, logging and loading the
    next batch, counts); the last one closes at the last mark. Read incrementally, and from scratch after reset."""
    import sparselora.bench.timing as timing

    now = iter([0.0, 1.5, 4.0, 4.5, 10.0, 10.25])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(now))
    clock = timing.Clock(torch.device("cpu"))
    clock.mark()
    assert clock.seconds() == []
    clock.mark()
    clock.mark()
    assert clock.seconds() == [1.5, 2.5]
    clock.mark()
    assert clock.seconds(wait=True) == [1.5, 2.5, 0.5]
    assert clock.intervals_ms() == [1500.0, 2500.0, 500.0]
    clock.reset()
    clock.mark()
    clock.mark()
    assert clock.intervals_ms() == [250.0]


def test_graph_trainer_evaluates_with_the_wrapped_collator(tmp_path):
    """Evaluation batches come through the same (HostCounts-wrapped) collator: their counts must not reach the model."""
    from transformers import TrainingArguments

    from sparselora import CUDAGraphTrainer
    from sparselora.data import DataCollator, Example, tokenize_examples

    tok = tiny_tokenizer()
    model = tiny_peft("llama", vocab_size=len(tok), r=4)
    apply_sparselora(model, SparseLoRAConfig(**CFG), fast_kernels=True)
    feats, _ = tokenize_examples([Example(r["prompt"], r["completion"]) for r in _rows(6)], tok, max_length=128)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    trainer = CUDAGraphTrainer(model=model, args=args, train_dataset=feats, eval_dataset=feats[:4],
                               data_collator=DataCollator(tok))
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == metrics["eval_loss"] and metrics["eval_loss"] > 0  # finite, not NaN
