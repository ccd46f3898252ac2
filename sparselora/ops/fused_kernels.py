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
        elif name == "rope":
            from liger_kernel.transformers.rope import liger_rotary_pos_emb as fn
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


def rope_kernel():
    """liger-kernel's fused RoPE of q and k, ``fn(q, k, cos, sin) -> (q, k)``, or None when it is not installed."""
    return _liger("rope")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    fn = _liger("silu_mul") if gate.is_cuda else None
    return fn.apply(gate, up) if fn is not None else F.silu(gate) * up


def head_positions(labels: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Flat indices into (batch, seq - 1) of the positions whose next token is labelled: the rows the LM head
    reads. With ``num_rows`` (at least their count, known to the caller) they come first, padded with unlabelled
    positions, found without a host sync (a stable sort instead of ``nonzero``), as a CUDA graph needs."""
    flat = labels[:, 1:].reshape(-1)
    if num_rows is None:
        return (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return torch.argsort((flat == IGNORE_INDEX).to(torch.int8), stable=True)[:num_rows]


def head_rows_of(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`head_positions` (into (batch, seq - 1)) as flat row indices into (batch, seq), ``seq_len`` >= 2."""
    return positions + positions // (seq_len - 1)


def labelled_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items: int | torch.Tensor | None = None,
    num_rows: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal-LM loss from the hidden states of labelled positions only: full-vocabulary logits are never
    formed for context tokens. Same value as transformers' loss (mean over labelled tokens, or sum divided by
    ``num_items`` as the Trainer passes under gradient accumulation).

    ``num_rows`` finds the positions without a host sync (`head_positions`; ``positions`` if the caller has
    them already); liger's fused loss syncs, so it is not used while a graph is being captured: a frozen head
    then takes the chunked loss, under autocast too (the full float32 logits of every labelled row, their
    log-softmax and gradient were a few GB at a 152k vocabulary)."""
    _, T, width = hidden.shape
    if T < 2:
        return hidden.sum() * 0.0
    if positions is None:
        positions = head_positions(labels, num_rows)
    h = hidden.reshape(-1, width).index_select(0, head_rows_of(positions, T))
    target = labels[:, 1:].reshape(-1)[positions]
    reduction = "sum" if num_items is not None else "mean"
    fn = _liger("flce") if h.is_cuda and not torch.cuda.is_current_stream_capturing() else None
    if h.shape[0] == 0:
        return hidden.sum() * 0.0
    if fn is not None:
        loss = fn.apply(h, weight, target, None, None, IGNORE_INDEX, 0.0, 0.0, reduction)
        loss = loss[0] if isinstance(loss, tuple) else loss
    elif not weight.requires_grad:
        device = h.device.type
        if torch.is_autocast_enabled(device):  # the head GEMMs in the autocast dtype, as nn.Linear's under autocast
            dtype = torch.get_autocast_dtype(device)
            h, weight = h.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):  # the chunks' GEMMs write into a preallocated gradient
            loss = _ChunkedHeadCrossEntropy.apply(h, weight, target)  # the sum over rows (IGNORE_INDEX ones: 0)
        if reduction == "mean":
            loss = loss / (target != IGNORE_INDEX).sum()  # as F.cross_entropy (no host sync)
    else:  # a trained head (its weight gradient needs the whole logits' gradient)
        loss = F.cross_entropy((h @ weight.t()).float(), target, reduction=reduction)
    return loss / num_items if num_items is not None else loss


HEAD_CHUNK_BYTES = 32 << 20  # float32 logits of one chunk of rows on a CPU: 32 MB (170 rows of a 49k vocabulary)
# On a GPU a chunk is larger and a multiple of 128 rows: the head GEMM of a 65-row chunk (32 MB of a 128k
# vocabulary) fills half of its 128-row tiles. 256 MB: 512 rows of a 128k vocabulary, 384 of Qwen's 152k.
HEAD_CHUNK_BYTES_GPU, HEAD_CHUNK_ALIGN_GPU = 256 << 20, 128


def head_chunk_rows(vocab: int, device_type: str = "cpu") -> int:
    """Rows of one chunk of the chunked head loss (its float32 logits fill at most the chunk's bytes)."""
    if device_type == "cuda":
        aligned = HEAD_CHUNK_BYTES_GPU // (4 * vocab) // HEAD_CHUNK_ALIGN_GPU * HEAD_CHUNK_ALIGN_GPU
        return max(HEAD_CHUNK_ALIGN_GPU, aligned)
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ W^T, target) for a frozen head W, a chunk of rows at a time: the full
    (rows x vocabulary) logits, their log-softmax and its gradient are never held whole (with a 49k vocabulary a
    batch's were three tensors of ~0.2-0.35 GB each at the step's peak). The input gradient of each chunk is
    computed in the forward, from the chunk's logits, and only it (rows x hidden) is kept for the backward:
    the same GEMMs as autograd's forward + backward of the head, no recomputation. Values agree with
    F.cross_entropy to float rounding (the softmax gradient is formed as softmax - onehot and scaled by the
    incoming gradient last; tested)."""

    @staticmethod
    def forward(ctx, h, weight, target):
        rows = head_chunk_rows(weight.shape[0], h.device.type)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 logits, as the plain head's .float()
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], rows):
            logp = torch.log_softmax((h[s:s + rows] @ weight.t()).to(acc), dim=-1)  # as F.cross_entropy
            t = target[s:s + rows].unsqueeze(1)
            valid = t != IGNORE_INDEX  # rows a bucketed head adds (CUDAGraphStep) carry no label
            t = t.clamp_min(0)
            total -= logp.gather(1, t).masked_fill_(~valid, 0.0).sum()
            if need_grad:  # d/dlogits of the rows' loss: softmax - onehot (in place, in the log-softmax's memory)
                probs = logp.exp_()
                probs.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=probs.dtype, device=probs.device))
                probs.masked_fill_(~valid, 0.0)
                torch.mm(probs.to(weight.dtype), weight, out=grad[s:s + rows])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype) if grad is not None else None), None, None
