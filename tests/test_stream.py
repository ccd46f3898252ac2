"""The permuted residual stream (`modules.stream`): inside a run of attention-sparse layers the hidden states really
are in context-first order, and logits, loss and every gradient still match the masked reference; the stream stays
in order when hidden states are returned; the last layer's head-rows FFN finds its rows inside a run."""

from __future__ import annotations

import pytest
import torch

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.models.registry import causal_lm, decoder_layers
from sparselora.modules.stream import runs
from sparselora.patch import get_state

from helpers import ARCHS, assert_close, clone, make_batch, step_outputs, tiny_peft
from reference import install_reference

# one run, layers 1-3 of 4 (ending at the last layer); layer 2's FFN dense inside it
CFG = dict(ffn_sparsity={1: 0.5, 3: 0.5}, attn_sparsity={1: 0.5, 2: 0.5, 3: 0.5}, start_step=0)


def layer_input(model, i):
    seen = []
    handle = decoder_layers(causal_lm(model))[i].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    return seen, handle


def compare(a, b, what):
    for name, x, y in (("logits", a[0], b[0]), ("loss", a[1], b[1])):
        if x is not None:
            assert_close(x, y, f"{what} {name}")
    assert a[2].keys() == b[2].keys() and a[2]
    for n in a[2]:
        assert_close(a[2][n], b[2][n], f"{what} grad {n}")


def test_runs_of_consecutive_layers():
    assert runs([5, 1, 2, 3, 7, 8]) == [(1, 3), (5, 5), (7, 8)]
    assert runs([]) == []


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stream_is_permuted_inside_a_run_and_matches_reference(arch, padding_side):
    model = tiny_peft(arch)
    ref = clone(model)
    batch = make_batch(padding_side=padding_side, seed=5)
    apply_sparselora(model, SparseLoRAConfig(**CFG))
    seen, h = layer_input(model, 2)
    sparse = step_outputs(model, batch)
    h.remove()
    split = get_state(model).split
    assert get_state(model).stream_permuted
    handles = install_reference(ref, kept_channels(model), batch)
    ref_seen, h = layer_input(ref, 2)
    compare(sparse, step_outputs(ref, batch), f"{arch}/{padding_side}")
    h.remove()
    x, x_ref = seen[0].reshape(-1, seen[0].shape[-1]), ref_seen[0].reshape(-1, seen[0].shape[-1])
    assert_close(x, x_ref[split.order], "layer 2's input, in context-first order")
    assert not torch.equal(split.order, torch.arange(split.order.numel()))  # the check above can tell
    for hd in handles:
        hd.remove()


def test_hidden_states_out_keeps_the_stream_in_order():
    model = tiny_peft("llama")
    ref = clone(model)
    batch = make_batch(seed=6)
    apply_sparselora(model, SparseLoRAConfig(**CFG))
    out = model(**batch, output_hidden_states=True)
    assert not get_state(model).stream_permuted
    handles = install_reference(ref, kept_channels(model), batch)
    ref_out = ref(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref_out.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
        assert_close(a.detach(), b.detach(), f"hidden state {i}")
    for hd in handles:
        hd.remove()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_head_rows_ffn_inside_a_run(padding_side):
    """The last layer's attention sparse, its FFN dense: the fast path computes that FFN on the head's rows only,
    which inside the run sit where the permutation put them."""
    cfg = dict(ffn_sparsity={1: 0.5}, attn_sparsity={1: 0.5, 2: 0.5, 3: 0.5}, start_step=0)
    model = tiny_peft("llama")
    ref = clone(model)
    batch = make_batch(padding_side=padding_side, seed=7)
    apply_sparselora(model, SparseLoRAConfig(**cfg), fast_kernels=True)
    sparse = step_outputs(model, batch)
    assert get_state(model).head_rows_index is not None and get_state(model).stream_permuted
    handles = install_reference(ref, kept_channels(model), batch)
    compare(sparse, step_outputs(ref, batch), f"fast/{padding_side}")
    for hd in handles:
        hd.remove()
