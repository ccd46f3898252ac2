"""Row/column gathers whose backward is a gather too.

Autograd's backward of ``index_select`` is an ``index_add`` into zeros, a scatter that is many times slower
than the gather on CPU and needs atomics on GPU. Every index used here is either a permutation (token rows)
or a set of distinct channels, so the exact backward is itself a gather.
"""

from __future__ import annotations

import torch


def _spread_columns(src: torch.Tensor, cols: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) with src's columns at ``cols`` and zeros elsewhere (``cols`` distinct)."""
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
        return grad.index_select(1, cols), None, None


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cols):
        ctx.save_for_backward(cols)
        ctx.width = x.shape[1]
        return x.index_select(1, cols)

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
