"""Sparse projections for context tokens: the frozen base weight is read only on kept channels, the LoRA
branch stays dense. Plain PyTorch ops (index_select + linear), so autograd gives the exact gradient of the
sparse function with respect to the inputs and every LoRA parameter; frozen weights get no gradient.

A projection is either a plain ``nn.Linear`` or a PEFT ``lora.Linear`` (base layer + adapters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselora.ops.fused_kernels import silu_mul
from sparselora.ops.lora_layer import active_adapters, base_weight_bias
from sparselora.ops.indexing import gather_columns, spread_columns


def lora_delta(
    module: nn.Module,
    x: torch.Tensor,
    out_rows: torch.Tensor | None = None,
    in_cols: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The summed LoRA branch of a PEFT layer, or None for a plain Linear.

    ``out_rows`` computes only those output channels (rows of B); ``in_cols`` says x holds only those input
    channels (columns of A), the others being zero. Both give the same values and gradients as the full
    branch followed by slicing, without forming the full-width tensors.
    """
    if not hasattr(module, "lora_A"):
        return None
    out = None
    for name in active_adapters(module):
        A, B = module.lora_A[name], module.lora_B[name]
        h = module.lora_dropout[name](x.to(A.weight.dtype))
        wa = A.weight if in_cols is None else A.weight.index_select(1, in_cols)
        h = F.linear(h, wa)
        if out_rows is None:
            h = B(h)
        else:
            bias = None if B.bias is None else B.bias.index_select(0, out_rows)
            h = F.linear(h, B.weight.index_select(0, out_rows), bias)
        h = h * module.scaling[name]
        out = h if out is None else out + h
    return out


def _add(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """base + LoRA delta, added in the wider dtype and rounded once, as PEFT does (fp32 adapters on a bf16 base)."""
    if delta is None:
        return base
    return (base.to(delta.dtype) + delta).to(base.dtype) if delta.dtype != base.dtype else base + delta


def proj_out_sparse(module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q/k/v for context tokens: the base output only on ``rows`` (zero elsewhere), LoRA dense and added."""
    weight, bias = base_weight_bias(module)
    base = F.linear(x, weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows))
    return _add(spread_columns(base, rows, weight.shape[0]), lora_delta(module, x))


def proj_in_sparse(module: nn.Module, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """o_proj for context tokens: the base reads only input columns ``cols``; LoRA dense on the full input."""
    weight, bias = base_weight_bias(module)
    base = F.linear(gather_columns(x, cols), weight.index_select(1, cols), bias)
    return _add(base, lora_delta(module, x))


def ffn_context(gate: nn.Module, up: nn.Module, down: nn.Module, x: torch.Tensor, keep: torch.Tensor):
    """``down[:, S] @ (silu(gate[S] x) * up[S] x)`` with each projection's LoRA branch restricted likewise:
    the dense MLP with intermediate channels outside S set to zero."""
    wg, bg = base_weight_bias(gate)
    wu, bu = base_weight_bias(up)
    wd, bd = base_weight_bias(down)
    pick = lambda b: None if b is None else b.index_select(0, keep)  # noqa: E731
    g = _add(F.linear(x, wg.index_select(0, keep), pick(bg)), lora_delta(gate, x, out_rows=keep))
    u = _add(F.linear(x, wu.index_select(0, keep), pick(bu)), lora_delta(up, x, out_rows=keep))
    h = silu_mul(g, u)
    return _add(F.linear(h, wd.index_select(1, keep), bd), lora_delta(down, h, in_cols=keep))
