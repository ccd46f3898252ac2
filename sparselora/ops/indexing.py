"""Row/column gathers whose backward is a gather too, and the column moves of the sparse projections.

Autograd's backward of ``index_select`` is an ``index_add`` into zeros, a scatter that is many times slower
than the gather on CPU and needs atomics on GPU. Every index used here is either a permutation (token rows)
or a set of distinct channels, so the exact backward is itself a gather.

Column moves (`take_columns`, `place_columns`): a sparse projection reads the kept input columns of its context
rows, or writes its kept output columns into a zero-filled full-width output, four times per attention layer
each way. torch's ``index_select(1, ...)`` / ``index_copy_(1, ...)`` on a GPU moved these several times slower than
memory allows (an H200 micro-benchmark, graphed: sparse q/k/v/o of Llama-3-8B on 3,600 of 4,096 rows cost 0.42 ms
a layer more than their FLOPs, whatever the sparsity); on CUDA they are one Triton kernel each, a tile of rows by
a tile of columns per program, writing every output element once (the zeros too). Pure data movement, so the
values are bitwise those of the torch ops, which CPUs keep.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_ROWS, _COLS = 32, 128  # tile of one program

if triton is not None:

    @triton.jit
    def _take_columns_kernel(x, cols, out, R, K, stride_x, stride_out, BR: tl.constexpr, BC: tl.constexpr):
        r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        c = tl.program_id(1) * BC + tl.arange(0, BC)
        in_c = c < K
        src = tl.load(cols + c, mask=in_c, other=0).to(tl.int64)
        m = (r < R)[:, None] & in_c[None, :]
        v = tl.load(x + r[:, None] * stride_x + src[None, :], mask=m)
        tl.store(out + r[:, None] * stride_out + c[None, :], v, mask=m)

    @triton.jit
    def _place_columns_kernel(src, where, out, R, W, stride_src, stride_out, BR: tl.constexpr, BC: tl.constexpr):
        r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
        j = tl.program_id(1) * BC + tl.arange(0, BC)
        in_j = j < W
        p = tl.load(where + j, mask=in_j, other=-1).to(tl.int64)
        m = (r < R)[:, None] & in_j[None, :]
        v = tl.load(src + r[:, None] * stride_src + p[None, :], mask=m & (p >= 0)[None, :], other=0.0)
        tl.store(out + r[:, None] * stride_out + j[None, :], v, mask=m)


def _fused(*ts: torch.Tensor) -> bool:
    """Whether the Triton column kernels take these 2-D tensors (CUDA, unit column stride)."""
    return triton is not None and all(t.is_cuda and t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1) for t in ts)


def take_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[:, cols]`` of a 2-D ``x`` as a new contiguous tensor (``cols``: distinct column indices)."""
    if not _fused(x) or x.shape[0] == 0 or cols.numel() == 0:
        return x.index_select(1, cols)
    R, K = x.shape[0], cols.numel()
    out = x.new_empty(R, K)
    _take_columns_kernel[(triton.cdiv(R, _ROWS), triton.cdiv(K, _COLS))](
        x, cols, out, R, K, x.stride(0), out.stride(0), BR=_ROWS, BC=_COLS)
    return out


def place_columns(src: torch.Tensor, cols: torch.Tensor, width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, width) with src's columns at ``cols`` (distinct) and zeros elsewhere, into ``out`` when given."""
    n = src.shape[0]
    if out is None:
        out = src.new_empty(n, width)
    if not _fused(src, out) or n == 0:
        out.zero_()
        return out.index_copy_(1, cols, src) if cols.numel() else out
    where = torch.full((width,), -1, dtype=torch.int32, device=src.device)
    where[cols] = torch.arange(cols.numel(), dtype=torch.int32, device=src.device)
    _place_columns_kernel[(triton.cdiv(n, _ROWS), triton.cdiv(width, _COLS))](
        src, where, out, n, width, src.stride(0), out.stride(0), BR=_ROWS, BC=_COLS)
    return out


def _spread_columns(src: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) with src's columns at ``cols`` and zeros elsewhere (``cols`` distinct)."""
    if _fused(src):
        return place_columns(src, cols, width)
    where = torch.full((width,), src.shape[1], dtype=torch.long, device=src.device)
    where[cols] = torch.arange(cols.numel(), device=src.device)
    return torch.cat([src, src.new_zeros(src.shape[0], 1)], 1).index_select(1, where)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _SpreadColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, cols, width):
        ctx.save_for_backward(cols)
        return _spread_columns(src, cols, width)

    @staticmethod
    def backward(ctx, grad):
        (cols,) = ctx.saved_tensors
        return take_columns(grad.contiguous(), cols), None, None


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cols):
        ctx.save_for_backward(cols)
        ctx.width = x.shape[1]
        return take_columns(x, cols)

    @staticmethod
    def backward(ctx, grad):
        (cols,) = ctx.saved_tensors
        return _spread_columns(grad, cols, ctx.width), None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm`` whose inverse is ``inverse``."""
    return _PermuteRows.apply(x, perm, inverse)


def spread_columns(src: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """Place src's columns at ``cols`` of a zero (n, width) tensor."""
    return _SpreadColumns.apply(src, cols, width)


def gather_columns(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``x[:, cols]`` for distinct ``cols``."""
    return _GatherColumns.apply(x, cols)
