"""The labelled-only head and the last layer's FFN on the head's rows only (`modules.fast`): against the plain
path (every row, transformers' head and loss), forward and every gradient, both padding sides, packed rows,
gradient checkpointing; every row again when hidden states are asked for or a forward has no labels."""

from __future__ import annotations

import pytest
import torch

from sparselora import SparseLoRAConfig, apply_sparselora, use_packed_attention
from sparselora.flop_count import flops
from sparselora.models.registry import causal_lm, decoder_layers

from helpers import assert_close, clone, make_batch, packed_batch, step_outputs, tiny_peft

CFG = dict(ffn_sparsity={1: 0.5, 2: 0.5}, attn_sparsity={2: 0.5}, start_step=0)  # the last layer (3) dense


def rows_seen(model):
    """Rows entering the last layer's down projection, per forward (a hook on its input)."""
    seen = []
    down = decoder_layers(causal_lm(model))[-1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    return seen, handle


def pair(arch="llama", **kw):
    plain = tiny_peft(arch, **kw)
    fast = clone(plain)
    apply_sparselora(plain, SparseLoRAConfig(**CFG))
    apply_sparselora(fast, SparseLoRAConfig(**CFG), fast_kernels=True)
    return plain, fast


def compare(fast, plain, batch):
    _, loss, grads = step_outputs(plain, batch)
    _, fast_loss, fast_grads = step_outputs(fast, batch)
    assert_close(fast_loss, loss, "loss")
    assert fast_grads.keys() == grads.keys() and grads
    for n in grads:
        assert_close(fast_grads[n], grads[n], f"grad {n}")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_last_ffn_runs_the_head_rows_only(arch, padding_side):
    plain, fast = pair(arch)
    batch = make_batch(padding_side=padding_side, labelled=(4, 6, 2), seed=5)
    seen, handle = rows_seen(fast)
    compare(fast, plain, batch)
    handle.remove()
    head_rows = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [head_rows] and head_rows < batch["labels"].numel()


def test_last_ffn_head_rows_on_packed_rows():
    plain, fast = pair("llama")
    batch = packed_batch()
    for m in (plain, fast):
        use_packed_attention(m)
    seen, handle = rows_seen(fast)
    compare(fast, plain, batch)
    handle.remove()
    assert seen == [int((batch["labels"][:, 1:] != -100).sum())]


def test_last_ffn_head_rows_under_gradient_checkpointing():
    plain, fast = pair("llama")
    for m in (plain, fast):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    batch = make_batch(labelled=(4, 6, 2), seed=8)
    seen, handle = rows_seen(fast)
    compare(fast, plain, batch)
    handle.remove()
    head_rows = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [head_rows, head_rows]  # the forward and its recomputation in the backward


def test_every_row_with_hidden_states_or_without_labels():
    plain, fast = pair("llama")
    batch = make_batch(labelled=(4, 6, 2), seed=6)
    n = batch["labels"].numel()
    seen, handle = rows_seen(fast)
    with torch.no_grad():
        out = fast(**batch, output_hidden_states=True)
        ref = plain(**batch, output_hidden_states=True)
        assert_close(out.hidden_states[-1], ref.hidden_states[-1], "last hidden state")
        fast(**batch)  # a labelled forward sets the head's rows ...
        unlabelled = {k: v for k, v in batch.items() if k != "labels"}
        logits = fast(**unlabelled).logits  # ... and the next forward, without labels, computes every row again
        ref_logits = plain(**unlabelled).logits
    handle.remove()
    assert seen[0] == n and seen[1] < n and seen[2] == n
    assert_close(logits, ref_logits, "logits of a forward without labels")


def test_flops_count_the_last_ffn_on_labelled_rows():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    every = flops(cfg, None, (2, 50), 10)
    head = flops(cfg, None, (2, 50), 10, labelled_only_head=True)
    dead = 2 * (50 - 10)  # rows neither the head nor anything after the last layer reads
    assert every["dense"] - head["dense"] == pytest.approx(4 * 64 * 1000 * dead + 3 * 4 * 64 * 176 * dead)
    assert head["sparse"] == pytest.approx(head["dense"])


def test_last_ffn_refuses_a_batch_the_head_rows_were_not_found_for():
    """The head's rows are set per causal-LM forward; the last FFN called on another batch shape (the model called
    inside another forward) is an error that says so, never rows of the wrong batch."""
    _, fast = pair("llama")
    batch = make_batch(labelled=(4, 6, 2), seed=6)
    with torch.no_grad():
        fast(**batch)  # sets the head's rows for this (batch, seq)
        mlp = decoder_layers(causal_lm(fast))[-1].mlp
        with pytest.raises(RuntimeError, match="the head's rows were found for"):
            mlp(torch.randn(2, 5, causal_lm(fast).config.hidden_size))
