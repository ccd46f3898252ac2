"""The eager path's host-work cuts, against the masked reference and against the unfused path they replace:
the fused FFN node (FFN projections without adapters, as with LoRA on q/k/v/o), over odd shapes, both padding
sides, packed rows, several families and selectors, float64, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparselora
from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels, use_packed_attention
from sparselora.modules import mlp as mlp_module
from sparselora.patch import get_state
from sparselora.ops.fused import split_ffn
from sparselora.ops.sparse_linear import ffn_context

from helpers import assert_close, clone, make_batch, packed_batch, step_outputs, tiny_peft
from reference import install_reference

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cfg(layers=(0, 2, 3), ffn=0.6, attn=0.5, **kw):
    kw.setdefault("start_step", 0)
    return SparseLoRAConfig(ffn_sparsity={i: ffn for i in layers}, attn_sparsity={i: attn for i in layers}, **kw)


def compare(a, b, dtype=torch.float32, what="", exact=False):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    assert ga.keys() == gb.keys() and ga
    pairs = [("logits", la, lb), ("loss", lossa, lossb)] + [(f"grad {n}", ga[n], gb[n]) for n in ga]
    for name, x, y in pairs:
        if name == "logits" and (x is None or y is None):  # fast_kernels: a forward with labels returns no logits
            assert x is None or not exact
            continue
        if exact:
            assert torch.equal(x, y), f"{what} {name} differs from the unfused path"
        else:
            assert_close(x, y, f"{what} {name}", dtype)


def against_reference(model, ref, batch, dtype=torch.float32, what=""):
    torch.manual_seed(0)
    sparse = step_outputs(model, batch)
    kept = kept_channels(model)
    assert kept and all("ffn" in e for e in kept.values())
    handles = install_reference(ref, kept, batch)
    torch.manual_seed(0)
    compare(sparse, step_outputs(ref, batch), dtype, what)
    for h in handles:
        h.remove()
    return sparse


def test_the_fused_ffn_path_is_taken(monkeypatch):
    calls = []
    real = mlp_module.split_ffn
    monkeypatch.setattr(mlp_module, "split_ffn", lambda *a: calls.append(1) or real(*a))
    model = tiny_peft("llama", targets=QKVO)
    apply_sparselora(model, cfg())
    step_outputs(model, make_batch())
    assert len(calls) == 3
    calls.clear()
    model = tiny_peft("llama")  # LoRA on the FFN too: the unfused path
    apply_sparselora(model, cfg())
    step_outputs(model, make_batch())
    assert not calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("selector", ["sampled", "svd", "random"])
def test_fused_ffn_matches_reference(arch, padding_side, selector):
    model = tiny_peft(arch, targets=QKVO)
    ref = clone(model)
    apply_sparselora(model, cfg(selector=selector), fast_kernels=selector == "svd")
    batch = make_batch(padding_side=padding_side, seed=3)
    against_reference(model, ref, batch, what=f"{arch}/{padding_side}/{selector}")


@pytest.mark.parametrize("fast_kernels", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_fused_ffn_is_bitwise_the_unfused_path(monkeypatch, fast_kernels, padding_side):
    """Same GEMMs and elementwise ops in the same order: identical logits, loss and gradients."""
    model = tiny_peft("qwen2", targets=QKVO)
    apply_sparselora(model, cfg(selector="random"), fast_kernels=fast_kernels)
    batch = make_batch(padding_side=padding_side, seed=9, lengths=(24, 5, 19), labelled=(1, 5, 7))
    torch.manual_seed(0)
    fused = step_outputs(model, batch)
    monkeypatch.setattr(mlp_module, "ffn_parts", lambda *a: None)
    torch.manual_seed(0)
    unfused = step_outputs(model, batch)
    compare(fused, unfused, what="fused vs unfused", exact=True)


def test_fused_ffn_float64_and_every_layer_sparse():
    model = tiny_peft("llama", dtype=torch.float64, targets=QKVO)
    ref = clone(model)
    apply_sparselora(model, cfg(layers=range(4), ffn=0.8, attn=0.7, selector="sampled", sample_rows=5))
    against_reference(model, ref, make_batch(seed=11, lengths=(24, 3, 13), labelled=(2, 1, 4)), torch.float64, "f64")


def test_fused_ffn_on_packed_rows():
    batch = packed_batch()
    model = tiny_peft("llama", targets=QKVO)
    use_packed_attention(model)
    ref = clone(model)
    apply_sparselora(model, cfg(layers=(1, 2, 3), selector="svd"), fast_kernels=True)
    against_reference(model, ref, batch, what="packed")


def test_fused_ffn_gradient_checkpointing():
    """Several batches: the recompute in backward must choose the channels of its forward, also when the FFN
    scores are averaged over batches (a recompute runs no causal-LM forward, so nothing is committed)."""
    model = tiny_peft("llama", targets=QKVO)
    ckpt = clone(model)
    for m in (model, ckpt):
        apply_sparselora(m, cfg(selector="sampled", sample_rows=9))
        m.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert get_state(ckpt).running_scores  # the default score_momentum averages
    for seed in (4, 5, 6):
        batch = make_batch(seed=seed)
        compare(step_outputs(model, batch), step_outputs(ckpt, batch), what=f"checkpointing, batch {seed}")


def test_fused_ffn_all_context_or_no_context_rows_and_biases():
    """The op alone, with biases on every projection: the unfused formulas for n_ctx = 0, some, all (bitwise when
    the row blocks are 32-byte aligned, as with any real hidden size; else the CPU BLAS may round the last bit of a
    GEMM written into an unaligned row block differently); float64 gradcheck."""
    for d in (8, 7):
        _check_split_ffn(d, exact=d == 8)


def _check_split_ffn(d, exact):
    torch.manual_seed(0)
    i = 13
    gate, up, down = nn.Linear(d, i), nn.Linear(d, i), nn.Linear(i, d)
    for m in (gate, up, down):
        m.requires_grad_(False)
    parts = (gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)
    keep = torch.tensor([0, 3, 4, 11])
    for n_ctx in (0, 5, 9):
        x = torch.randn(9, d, requires_grad=True)
        y = split_ffn(parts, x, n_ctx, keep)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
        x2 = x.detach().clone().requires_grad_(True)
        parts_ = [ffn_context(gate, up, down, x2[:n_ctx], keep)] if n_ctx else []
        if n_ctx < 9:
            xd = x2[n_ctx:]
            parts_.append(down(F.silu(gate(xd)) * up(xd)))
        y2 = torch.cat(parts_)
        (gx2,) = torch.autograd.grad(y2, x2, gy)
        if exact:
            assert torch.equal(y, y2) and torch.equal(gx, gx2), n_ctx
        else:
            assert_close(y, y2, f"y n_ctx={n_ctx}")
            assert_close(gx, gx2, f"gx n_ctx={n_ctx}")
    parts64 = tuple(p.double() for p in parts)
    x = torch.randn(9, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: split_ffn(parts64, t, 5, keep), (x,))


def test_fast_rope_swaps_the_modeling_function_while_in_use(monkeypatch):
    """fast_kernels swaps the model's modeling-module RoPE function for the liger dispatcher while any model uses
    it and restores it after the last `remove`; off CUDA the dispatcher runs the original (bitwise), on CUDA the
    fused kernel (a stand-in here, to check the dispatch), and any other call form the original."""
    import transformers.models.llama.modeling_llama as ml

    import sparselora.modules.fast as fast
    from sparselora import remove_sparselora

    # a clean slate: models of earlier tests may still hold the swap (monkeypatch puts their state back after)
    original = getattr(ml.apply_rotary_pos_emb, "sparselora_original", ml.apply_rotary_pos_emb)
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", original)
    monkeypatch.setattr(fast.FastRoPE, "_installed", {})
    cfg = SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={2: 0.5}, start_step=0)
    no_liger = tiny_peft("llama")
    monkeypatch.setattr(fast, "rope_kernel", lambda: None)  # liger-kernel not installed: nothing to swap in
    apply_sparselora(no_liger, cfg, fast_kernels=True)
    assert ml.apply_rotary_pos_emb is original
    remove_sparselora(no_liger)
    calls = []
    monkeypatch.setattr(fast, "rope_kernel", lambda: lambda q, k, cos, sin: calls.append(q.shape) or ("fused", k))
    a, b = tiny_peft("llama"), tiny_peft("llama")
    apply_sparselora(a, cfg, fast_kernels=True)
    apply_sparselora(b, cfg, fast_kernels=True)
    swapped = ml.apply_rotary_pos_emb
    assert swapped is not original and swapped.sparselora_original is original
    g = torch.Generator().manual_seed(0)
    q, k, cos, sin = (torch.randn(s, generator=g) for s in ((2, 4, 5, 8), (2, 2, 5, 8), (2, 5, 8), (2, 5, 8)))
    for got, want in zip(swapped(q, k, cos, sin), original(q, k, cos, sin)):
        assert torch.equal(got, want)
    a(**make_batch(seed=2)).loss.backward()  # a training step through the swapped function
    assert not calls
    cuda_like = type("CudaLike", (), {"is_cuda": True, "shape": (9,)})()
    assert swapped(cuda_like, k, cos, sin) == ("fused", k) and calls == [(9,)]
    for got, want in zip(swapped(q, k, cos, sin, unsqueeze_dim=1), original(q, k, cos, sin)):
        assert torch.equal(got, want)
    remove_sparselora(a)
    assert ml.apply_rotary_pos_emb is swapped  # b still uses it
    remove_sparselora(b)
    assert ml.apply_rotary_pos_emb is original


def test_hub_kernels_do_not_undo_the_swaps(tmp_path):
    """transformers >= 5.25 loads models kernelized and kernelizes again at every train()/eval(), which resets
    instance forwards: SparseLoRA turns that off while applied (its fused norm stays in place across mode
    switches) and back on at `remove_sparselora`."""
    from transformers import AutoModelForCausalLM

    from sparselora import remove_sparselora
    from sparselora.models.registry import decoder_layers

    from helpers import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    if not getattr(hf, "use_kernels", False):
        pytest.skip("this transformers loads models without hub kernels")
    apply_sparselora(hf, SparseLoRAConfig(ffn_sparsity={1: 0.5}, attn_sparsity={}, start_step=0), fast_kernels=True)
    assert not hf.use_kernels
    norm = decoder_layers(hf)[0].input_layernorm
    for mode in (False, True, False):
        hf.train(mode)
        assert "forward" in norm.__dict__, "a mode switch reset the fused norm's forward"
    remove_sparselora(hf)
    assert hf.use_kernels and "forward" not in norm.__dict__
