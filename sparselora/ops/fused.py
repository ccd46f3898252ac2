"""One autograd node per projection: base (dense rows + sliced context rows) and LoRA in a few GEMMs.

Rows arrive permuted, context rows first (`TokenSplit`). For a projection ``y = x W^T + b + s (x A^T) B^T``:
- mode ``"out"`` (q/k/v): context rows get the base only on output channels ``idx`` (zero elsewhere);
- mode ``"in"`` (o): context rows read only input channels ``idx``;
- ``n_ctx = 0``: the plain dense LoRA projection.
The LoRA branch is dense for every row and added into the base output by the GEMM itself (``addmm_``). LoRA
dropout (PEFT's ``lora_dropout``, on the branch's input) is drawn from torch's RNG (`ops.dropout`: on CUDA a seed,
the mask regenerated in the backward), so it replays under CUDA graphs and gradient checkpointing like
``nn.Dropout``.
The backward is written out: input gradient through the same sliced weights, LoRA A/B gradients; frozen base
weights get none. This replaces ~20 small autograd ops per projection with ~6 kernels each way, which is what
keeps the GPU fed (the step is otherwise host-bound).
"""

from __future__ import annotations

import torch

from sparselora.ops import dropout


def _save_slices(x: torch.Tensor) -> bool:
    """Whether the fused ops keep the context rows' sliced weights for the backward (GPU: time counts) or slice
    them again there (CPU: host memory counts)."""
    return x.is_cuda


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
            xl, s = x.to(lora_a.dtype), scale
            if p_drop > 0:
                keep = dropout.draw(x, p_drop)
                # one pass over the input: dropout's 1 / (1 - p) goes on the rank-r product, not the full width
                xl, s = dropout.dropped(x, keep, p_drop, lora_a.dtype), scale / (1.0 - p_drop)
            h = (xl @ lora_a.t()) * s
            if lora_b.dtype == y.dtype:
                y.addmm_(h, lora_b.t())
            else:  # wider adapters (PEFT's default fp32 on a bf16 base): add in their dtype, round once, as PEFT
                y.copy_(torch.addmm(y.to(lora_b.dtype), h, lora_b.t()))
        # on a CPU the sliced weight is not saved: the backward selects it again from ``idx`` (a copy of a few MB
        # per projection and layer would otherwise stay resident until the backward; host memory is what limits
        # CPU runs). On a GPU the saved slice spares the backward a gather (time is what limits GPU runs).
        if not _save_slices(x):
            w_ctx = None
        ctx.save_for_backward(x, weight, idx, lora_a, lora_b, h, keep, w_ctx)
        ctx.n_ctx, ctx.mode, ctx.scale, ctx.p_drop = n_ctx, mode, scale, p_drop
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, idx, lora_a, lora_b, h, keep, w_ctx = ctx.saved_tensors
        n_ctx, mode, scale = ctx.n_ctx, ctx.mode, ctx.scale
        if n_ctx and w_ctx is None:
            w_ctx = weight.index_select(0 if mode == "out" else 1, idx)
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
            if keep is not None:  # d/dx of (x * keep / (1 - p)) A^T: the scale on the rank-r gh, the mask once
                gh = gh / (1.0 - ctx.p_drop)
                xl = dropout.dropped(x, keep, ctx.p_drop, lora_a.dtype)
            else:
                xl = x.to(lora_a.dtype)
            ga = gh.t() @ xl
            if gx is not None:
                if keep is not None:
                    dropout.add_dropped_(gx, gh @ lora_a, keep, ctx.p_drop)
                elif lora_a.dtype == gx.dtype:
                    gx.addmm_(gh, lora_a)
                else:
                    gx += (gh @ lora_a).to(gx.dtype)
        return gx, None, None, ga, gb, None, None, None, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on ``x``'s device, or None when autocast is off there."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _apply_as_autocast(fn, x: torch.Tensor, *args):
    """``fn.apply(x, *args)`` with autocast's rule for a linear layer replayed: every floating tensor argument
    (input, frozen weights, LoRA factors) cast to the autocast dtype, the op itself run with autocast off. The
    casts are ordinary autograd ops, so a float32 adapter's gradient comes back cast to float32, as under
    autocast. This is what keeps the fused ops on under ``Trainer(bf16=True)``, whose forward accelerate wraps in
    autocast (they used to step aside there, so every Trainer run on a GPU took the unfused path)."""
    dt = _autocast_dtype(x)
    if dt is None:
        return fn.apply(x, *args)
    cast = [a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in (x, *args)]
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(*cast)


def split_lora_linear(parts, x: torch.Tensor, n_ctx: int = 0, mode: str | None = None, idx: torch.Tensor | None = None):
    """The fused projection of 2-D ``x`` (rows permuted context-first when ``n_ctx`` > 0); under autocast it
    computes in the autocast dtype, as the projection's own forward would."""
    weight, bias, a, b, scale, p = parts
    return _apply_as_autocast(_SplitLoRALinear, x, weight, bias, a, b, scale, n_ctx, mode, idx, p)


def lora_linear(parts, x: torch.Tensor) -> torch.Tensor:
    """The fused dense projection of ``x`` of any leading shape."""
    y = split_lora_linear(parts, x.reshape(-1, x.shape[-1]))
    return y.view(*x.shape[:-1], y.shape[-1])


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with the kernel F.linear picks for a 2-D input (addmm with a bias, mm without)."""
    return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())


def _swiglu():
    """liger-kernel's SwiGLU forward/backward (what `fused_kernels.silu_mul` runs on CUDA), or None."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


class _SplitFFN(torch.autograd.Function):
    """down(silu(gate x) * up x) of frozen, adapter-free projections on rows permuted context-first: the first
    ``n_ctx`` rows see only the intermediate channels ``keep``, the others all of them. The same GEMMs and
    elementwise ops, in the same order, as the unfused path (`ops.sparse_linear.ffn_context` for the context rows,
    the dense MLP for the others), so values and gradients are bitwise those of the unfused path; one autograd
    node instead of ~15."""

    @staticmethod
    def forward(ctx, x, wg, bg, wu, bu, wd, bd, n_ctx, keep):
        N = x.shape[0]
        y = x.new_empty(N, wd.shape[0])
        liger = _swiglu() if x.is_cuda else None
        pick = lambda b: None if b is None else b.index_select(0, keep)  # noqa: E731
        saved, sliced = [], (None, None, None)
        for rows, ws in ((slice(0, n_ctx), None if not n_ctx else
                          (wg.index_select(0, keep), pick(bg), wu.index_select(0, keep), pick(bu), wd.index_select(1, keep))),
                         (slice(n_ctx, N), None if N == n_ctx else (wg, bg, wu, bu, wd))):
            if ws is None:
                saved += [None] * 2
                continue
            g_w, g_b, u_w, u_b, d_w = ws
            xs = x[rows]
            g, u = _linear(xs, g_w, g_b), _linear(xs, u_w, u_b)
            h = liger[0](g, u)[2] if liger is not None else torch.nn.functional.silu(g) * u
            torch.addmm(bd, h, d_w.t(), out=y[rows]) if bd is not None else torch.mm(h, d_w.t(), out=y[rows])
            saved += [g, u]
            if ws is not None and rows.start == 0 and _save_slices(x):
                sliced = (g_w, u_w, d_w)
        # on a CPU the full weights and ``keep``, not the context rows' sliced copies (three weight-sized copies per
        # sparse layer held until the backward otherwise): the backward slices them again; on a GPU the slices are
        # kept (memory is ample there, a gather per weight is not free)
        ctx.save_for_backward(wg, wu, wd, keep if n_ctx else None, *saved, *sliced)
        ctx.n_ctx, ctx.liger, ctx.width = n_ctx, liger is not None, x.shape[1]
        return y

    @staticmethod
    def backward(ctx, gy):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        gy = gy.contiguous()
        wg, wu, wd, keep, *saved = ctx.saved_tensors
        saved, sliced = saved[:4], saved[4:]
        n_ctx, N = ctx.n_ctx, gy.shape[0]
        gx = gy.new_empty(N, ctx.width)
        liger = _swiglu() if ctx.liger else None
        for rows, (g, u) in ((slice(0, n_ctx), saved[:2]), (slice(n_ctx, N), saved[2:])):
            if g is None:
                continue
            if rows.start == 0 and n_ctx:
                g_w, u_w, d_w = sliced if sliced[0] is not None else (
                    wg.index_select(0, keep), wu.index_select(0, keep), wd.index_select(1, keep))
            else:
                g_w, u_w, d_w = wg, wu, wd
            gh = gy[rows] @ d_w
            if liger is not None:  # liger's backward overwrites g and u with their gradients (as its autograd node does)
                gg, gu = liger[1](g, u, gh)
            else:  # autograd's backward of F.silu(g) * u, op for op
                gu = gh * torch.nn.functional.silu(g)
                gg = torch.ops.aten.silu_backward(gh * u, g)
            out = gx[rows]
            torch.mm(gg, g_w, out=out)
            out.add_(gu @ u_w)  # autograd sums the two input gradients the same way
        return gx, None, None, None, None, None, None, None, None


def ffn_parts(gate, up, down):
    """(wg, bg, wu, bu, wd, bd) when gate/up/down are frozen projections without an active adapter (plain Linear,
    or PEFT layers whose adapters are off) that the fused FFN reproduces; None otherwise."""
    from sparselora.ops.lora_layer import lora_parts

    out = []
    for m in (gate, up, down):
        parts = lora_parts(m)
        if parts is None or parts[2] is not None:
            return None
        out += [parts[0], parts[1]]
    return tuple(out)


def split_ffn(parts, x: torch.Tensor, n_ctx: int, keep: torch.Tensor) -> torch.Tensor:
    """The fused FFN of 2-D ``x`` (rows permuted context-first; ``n_ctx`` of them sparse on channels ``keep``)."""
    wg, bg, wu, bu, wd, bd = parts
    return _apply_as_autocast(_SplitFFN, x, wg, bg, wu, bu, wd, bd, n_ctx, keep)
