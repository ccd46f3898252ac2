"""SparseAttention's non-fused branch (the projection's own LoRA forward on gathered rows) against the masked
reference: it runs whenever the fused op cannot reproduce the layer exactly: autocast, several active adapters, a
LoRA dropout module other than nn.Dropout / nn.Identity."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from torch import nn

from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels
from sparselora.ops.lora_layer import lora_parts

from helpers import assert_close, clone, make_batch, step_outputs, tiny_peft
from reference import install_reference

LAYERS = (1, 3)


class FeatureScale(nn.Module):
    """A deterministic stand-in for LoRA dropout (a fixed per-feature scale): not an Identity, so the non-fused
    branch runs, and rows gathered or not see the same 'mask', so the sparse run and the reference can be compared
    in training mode."""

    def __init__(self, width: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("scale", torch.rand(width, generator=g) * 2)

    def forward(self, x):
        return x * self.scale.to(x.dtype)


def _attn_projs(model):
    for blk in model.base_model.model.model.layers:
        for p in "qkvo":
            yield getattr(blk.self_attn, f"{p}_proj")


def _sparse_vs_reference(model, batch, ctx=None):
    ref = clone(model)
    apply_sparselora(model, SparseLoRAConfig(attn_sparsity={i: 0.5 for i in LAYERS}, ffn_sparsity={1: 0.5},
                                             start_step=0))
    probe = next(_attn_projs(model))
    assert lora_parts(probe) is None or ctx is not None  # the non-fused branch
    with ctx if ctx is not None else torch.enable_grad():
        sparse = step_outputs(model, batch)
        kept = kept_channels(model)
        assert set(kept) == set(LAYERS)
        handles = install_reference(ref, kept, batch)
        want = step_outputs(ref, batch)
    for h in handles:
        h.remove()
    return sparse, want


def _compare(sparse, want, what):
    assert sparse[2].keys() == want[2].keys(), what
    assert_close(sparse[0], want[0], f"{what} logits", torch.float32)
    assert_close(sparse[1], want[1], f"{what} loss", torch.float32)
    for n in want[2]:
        assert_close(sparse[2][n], want[2][n], f"{what} grad {n}", torch.float32)


class OwnDropout(nn.Dropout):
    """A dropout subclass: the fused op handles only nn.Dropout itself."""


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_dropout_subclass_eval_mode(arch):
    model = tiny_peft(arch)
    for m in _attn_projs(model):
        m.lora_dropout["default"] = OwnDropout(0.3)
    model.eval()
    sparse, want = _sparse_vs_reference(model, make_batch(seed=2))
    _compare(sparse, want, f"{arch}/dropout-eval")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_dropout_train_mode(arch):
    """Training mode with a deterministic 'dropout': the LoRA branch of context and dense rows reads dropout(x)."""
    model = tiny_peft(arch)
    for j, m in enumerate(_attn_projs(model)):
        m.lora_dropout["default"] = FeatureScale(m.in_features, j)
    model.train()
    sparse, want = _sparse_vs_reference(model, make_batch(seed=4, padding_side="left"))
    _compare(sparse, want, f"{arch}/dropout-train")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_several_active_adapters(arch, caplog, monkeypatch):
    """Two active adapters: PEFT's own forward on gathered rows (the reference's numbers), and the run says once,
    with the reason, that projections left the fused op."""
    import sparselora.modules.base as base

    monkeypatch.setattr(base, "_said", set())
    model = tiny_peft(arch)
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.second" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    with caplog.at_level("WARNING", logger="sparselora"):
        sparse, want = _sparse_vs_reference(model, make_batch(seed=6))
    assert any("second" in n for n in want[2])
    _compare(sparse, want, f"{arch}/two-adapters")
    said = [r.getMessage() for r in caplog.records if "instead of the fused op" in r.getMessage()]
    assert len(said) == 1 and "2 adapters are active at once (default, second)" in said[0], said


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_autocast_bf16(arch):
    """Under CPU autocast the fused op is bypassed and the projections' own forwards cast per op. bf16 rounding
    depends on the order of operations, so the sparse run is judged against the float64 reference with the same
    channels: it may not be much further from it than the reference's own autocast run."""
    model = tiny_peft(arch)
    exact = clone(model).double()
    batch = make_batch(seed=8)
    sparse, ref_bf16 = _sparse_vs_reference(model, batch, ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    handles = install_reference(exact, kept_channels(model), batch)
    truth = step_outputs(exact, batch)
    for h in handles:
        h.remove()

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    pairs = [("logits", sparse[0], ref_bf16[0], truth[0]), ("loss", sparse[1], ref_bf16[1], truth[1])]
    pairs += [(f"grad {n}", sparse[2][n], ref_bf16[2][n], truth[2][n]) for n in truth[2]]
    for name, a, b, t in pairs:
        assert rel(a, t) <= 4 * rel(b, t) + 1e-2, f"{arch}/autocast {name}: {rel(a, t):.3g} vs reference {rel(b, t):.3g}"
