"""Fused elementwise kernels and the labelled-only loss: liger-kernel's Triton kernels on CUDA when it is
installed, plain PyTorch otherwise (same math, so CPU tests check the wiring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparselora.tokens import IGNORE_INDEX


def _liger(name: str):
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction as fn
        elif name == "silu_mul":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as fn
        else:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as fn
    except ImportError:
        return None
    return fn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm (statistics in float32, scaled in the input dtype)."""
    fn = _liger("rms_norm") if x.is_cuda else None
    if fn is not None:
        return fn.apply(x, weight, eps, 0.0, "llama", False)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    fn = _liger("silu_mul") if gate.is_cuda else None
    return fn.apply(gate, up) if fn is not None else F.silu(gate) * up


def labelled_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """Causal-LM loss from the hidden states of labelled positions only: full-vocabulary logits are never
    formed for context tokens. Same value as transformers' loss (mean over labelled tokens, or sum divided by
    ``num_items`` as the Trainer passes under gradient accumulation).

    ``num_rows`` (the count of labelled positions, known to the caller) finds them without a host sync (a
    stable sort instead of ``nonzero``), as a CUDA graph needs; liger's fused loss syncs, so it is not used
    while a graph is being captured."""
    shifted = labels[:, 1:]
    if num_rows is None:
        rows = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
        h = hidden[:, :-1][rows]
        target = shifted[rows]
    else:
        flat = shifted.reshape(-1)
        idx = torch.argsort((flat == IGNORE_INDEX).to(torch.int8), stable=True)[:num_rows]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[idx]
        target = flat[idx]
    reduction = "sum" if num_items is not None else "mean"
    fn = _liger("flce") if h.is_cuda and not torch.cuda.is_current_stream_capturing() else None
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    if fn is not None:
        loss = fn.apply(h, weight, target, None, None, IGNORE_INDEX, 0.0, 0.0, reduction)
        loss = loss[0] if isinstance(loss, tuple) else loss
    else:
        loss = F.cross_entropy((h @ weight.t()).float(), target, reduction=reduction)
    return loss / num_items if num_items is not None else loss
