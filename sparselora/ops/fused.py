"""One autograd node per projection: base (dense rows + sliced context rows) and LoRA in a few GEMMs.

Rows arrive permuted, context rows first (`TokenSplit`). For a projection ``y = x W^T + b + s (x A^T) B^T``:
- mode ``"out"`` (q/k/v): context rows get the base only on output channels ``idx`` (zero elsewhere);
- mode ``"in"`` (o): context rows read only input channels ``idx``;
- ``n_ctx = 0``: the plain dense LoRA projection.
The LoRA branch is dense for every row and added into the base output by the GEMM itself (``addmm_``). LoRA
dropout (PEFT's ``lora_dropout``, on the branch's input) is drawn as a mask from torch's RNG, so it replays under
CUDA graphs and gradient checkpointing like ``nn.Dropout``.
The backward is written out: input gradient through the same sliced weights, LoRA A/B gradients; frozen base
weights get none. This replaces ~20 small autograd ops per projection with ~6 kernels each way, which is what
keeps the GPU fed (the step is otherwise host-bound).
"""

from __future__ import annotations

import torch


class _SplitLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, n_ctx, mode, idx, p_drop):
        N = x.shape[0]
        y = x.new_empty(N, weight.shape[0])
        xd, yd = x[n_ctx:], y[n_ctx:]
        if N > n_ctx:
            torch.addmm(bias, xd, weight.t(), out=yd) if bias is not None else torch.mm(xd, weight.t(), out=yd)
        w_ctx = None
        if n_ctx:
            xc, yc = x[:n_ctx], y[:n_ctx]
            if mode == "out":
                w_ctx = weight.index_select(0, idx)
                part = xc @ w_ctx.t()
                if bias is not None:
                    part += bias.index_select(0, idx)
                yc.zero_()
                yc.index_copy_(1, idx, part)
            else:  # "in"
                w_ctx = weight.index_select(1, idx)
                xs = xc.index_select(1, idx)
                torch.addmm(bias, xs, w_ctx.t(), out=yc) if bias is not None else torch.mm(xs, w_ctx.t(), out=yc)
        h = keep = None
        if lora_a is not None:
            xl = x.to(lora_a.dtype)
            if p_drop > 0:
                keep = dropout_mask(xl, p_drop)
                xl = xl * keep / (1.0 - p_drop)
            h = (xl @ lora_a.t()) * scale
            if lora_b.dtype == y.dtype:
                y.addmm_(h, lora_b.t())
            else:  # wider adapters (PEFT's default fp32 on a bf16 base): add in their dtype, round once, as PEFT
                y.copy_(torch.addmm(y.to(lora_b.dtype), h, lora_b.t()))
        ctx.save_for_backward(x, weight, w_ctx, idx, lora_a, lora_b, h, keep)
        ctx.n_ctx, ctx.mode, ctx.scale, ctx.p_drop = n_ctx, mode, scale, p_drop
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, w_ctx, idx, lora_a, lora_b, h, keep = ctx.saved_tensors
        n_ctx, mode, scale = ctx.n_ctx, ctx.mode, ctx.scale
        gy = gy.contiguous()
        N = gy.shape[0]
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy.new_empty(x.shape)
            if N > n_ctx:
                torch.mm(gy[n_ctx:], weight, out=gx[n_ctx:])
            if n_ctx:
                if mode == "out":
                    torch.mm(gy[:n_ctx].index_select(1, idx), w_ctx, out=gx[:n_ctx])
                else:
                    gxc = gx[:n_ctx]
                    gxc.zero_()
                    gxc.index_copy_(1, idx, gy[:n_ctx] @ w_ctx)
        if lora_a is not None:
            gyl = gy.to(lora_b.dtype)
            gb = gyl.t() @ h
            gh = (gyl @ lora_b) * scale
            xl = x.to(lora_a.dtype)
            if keep is not None:
                xl = xl * keep / (1.0 - ctx.p_drop)
            ga = gh.t() @ xl
            if gx is not None:
                if keep is not None:
                    gx += ((gh @ lora_a) * keep / (1.0 - ctx.p_drop)).to(gx.dtype)
                elif lora_a.dtype == gx.dtype:
                    gx.addmm_(gh, lora_a)
                else:
                    gx += (gh @ lora_a).to(gx.dtype)
        return gx, None, None, ga, gb, None, None, None, None, None


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The kept entries of a dropout of ``x`` (same shape, x's dtype, 0/1), from torch's global RNG."""
    return (torch.rand_like(x) >= p).to(x.dtype)


def split_lora_linear(parts, x: torch.Tensor, n_ctx: int = 0, mode: str | None = None, idx: torch.Tensor | None = None):
    """The fused projection of 2-D ``x`` (rows permuted context-first when ``n_ctx`` > 0)."""
    weight, bias, a, b, scale, p = parts
    return _SplitLoRALinear.apply(x, weight, bias, a, b, scale, n_ctx, mode, idx, p)


def lora_linear(parts, x: torch.Tensor) -> torch.Tensor:
    """The fused dense projection of ``x`` of any leading shape."""
    y = split_lora_linear(parts, x.reshape(-1, x.shape[-1]))
    return y.view(*x.shape[:-1], y.shape[-1])
