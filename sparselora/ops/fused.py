"""One autograd node per projection (or per q/k/v group): base (dense rows + sliced context rows) and LoRA in a few
GEMMs.

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


def _into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = x W^T (+ b), written in place."""
    torch.addmm(b, x, w.t(), out=out) if b is not None else torch.mm(x, w.t(), out=out)


def _blocks(widths):
    """Column slices of blocks of these widths laid side by side."""
    out, start = [], 0
    for w in widths:
        out.append(slice(start, start + w))
        start += w
    return out


def _cat(ts, dim: int) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class _SplitLoRALinear(torch.autograd.Function):
    """Projections that read the same input (q, k and v, or one projection alone), as one node. Beside what one
    projection does, a group shares what it can: the context rows' sliced weights sit side by side, so one GEMM
    serves all of them each way; the input gradients accumulate into one buffer in the GEMMs (no autograd sum of
    three full-width gradients); without dropout the LoRA A factors are stacked (one GEMM reads the input, once
    forward and once for their gradients)."""

    @staticmethod
    def forward(ctx, x, n_ctx, mode, scales, p_drops, *flat):
        projs = [flat[i:i + 5] for i in range(0, len(flat), 5)]  # (weight, bias, lora_a, lora_b, idx) each
        N = x.shape[0]
        ys = [x.new_empty(N, w.shape[0]) for w, *_ in projs]
        if N > n_ctx:
            for (w, b, *_), y in zip(projs, ys):
                _into(x[n_ctx:], w, b, y[n_ctx:])
        w_ctx = None
        if n_ctx:
            xc = x[:n_ctx]
            if mode == "out":
                w_ctx = _cat([w.index_select(0, idx) for w, _, _, _, idx in projs], 0)
                part = xc @ w_ctx.t()
                for (w, b, _, _, idx), y, cols in zip(projs, ys, _blocks(pr[4].numel() for pr in projs)):
                    pc = part[:, cols]
                    if b is not None:
                        pc += b.index_select(0, idx)
                    yc = y[:n_ctx]
                    yc.zero_()
                    yc.index_copy_(1, idx, pc)
            else:  # "in": one projection
                (w, b, _, _, idx), = projs
                w_ctx = w.index_select(1, idx)
                _into(xc.index_select(1, idx), w_ctx, b, ys[0][:n_ctx])
        lora = [i for i, pr in enumerate(projs) if pr[2] is not None]
        hs, masks, a_cat = [None] * len(projs), [None] * len(projs), None
        if len(lora) > 1 and all(p_drops[i] == 0 for i in lora) and len({projs[i][2].dtype for i in lora}) == 1:
            a_cat = torch.cat([projs[i][2] for i in lora])
            h_cat = x.to(a_cat.dtype) @ a_cat.t()
            for i, cols in zip(lora, _blocks(projs[i][2].shape[0] for i in lora)):
                hs[i] = h_cat[:, cols].mul_(scales[i])
        for i in lora:
            a, b_lora, s, p = projs[i][2], projs[i][3], scales[i], p_drops[i]
            if hs[i] is None:
                xl = x.to(a.dtype)
                if p > 0:
                    masks[i] = dropout.draw(x, p)
                    # one pass over the input: dropout's 1 / (1 - p) goes on the rank-r product, not the full width
                    xl, s = dropout.dropped(x, masks[i], p, a.dtype), s / (1.0 - p)
                hs[i] = (xl @ a.t()) * s
            y = ys[i]
            if b_lora.dtype == y.dtype:
                y.addmm_(hs[i], b_lora.t())
            else:  # wider adapters (PEFT's default fp32 on a bf16 base): add in their dtype, round once, as PEFT
                y.copy_(torch.addmm(y.to(b_lora.dtype), hs[i], b_lora.t()))
        # on a CPU the sliced weights are not saved: the backward selects them again from the indices (a copy of a
        # few MB per projection and layer would otherwise stay resident until the backward; host memory is what
        # limits CPU runs). On a GPU the saved slices spare the backward a gather (time is what limits GPU runs).
        if not _save_slices(x):
            w_ctx = None
        per = [t for pr, h, m in zip(projs, hs, masks) for t in (pr[0], pr[4], pr[2], pr[3], h, m)]
        ctx.save_for_backward(x, w_ctx, a_cat, *per)
        ctx.n_ctx, ctx.mode, ctx.scales, ctx.p_drops = n_ctx, mode, scales, p_drops
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gys):
        x, w_ctx, a_cat, *per = ctx.saved_tensors
        projs = [per[i:i + 6] for i in range(0, len(per), 6)]  # (weight, idx, lora_a, lora_b, h, mask) each
        n_ctx, mode = ctx.n_ctx, ctx.mode
        if n_ctx and w_ctx is None:
            w_ctx = (_cat([w.index_select(0, idx) for w, idx, *_ in projs], 0) if mode == "out"
                     else projs[0][0].index_select(1, projs[0][1]))
        gys = [g.contiguous() for g in gys]
        N = x.shape[0]
        gx = None
        grads = [[None] * 5 for _ in projs]  # per projection: weight, bias, lora_a, lora_b, idx
        if ctx.needs_input_grad[0]:
            gx = gys[0].new_empty(x.shape)
            if N > n_ctx:
                out = gx[n_ctx:]
                torch.mm(gys[0][n_ctx:], projs[0][0], out=out)
                for (w, *_), gy in zip(projs[1:], gys[1:]):
                    out.addmm_(gy[n_ctx:], w)
            if n_ctx:
                if mode == "out":
                    gyc = _cat([gy[:n_ctx].index_select(1, idx) for (_, idx, *_), gy in zip(projs, gys)], 1)
                    torch.mm(gyc, w_ctx, out=gx[:n_ctx])
                else:
                    gxc = gx[:n_ctx]
                    gxc.zero_()
                    gxc.index_copy_(1, projs[0][1], gys[0][:n_ctx] @ w_ctx)
        lora = [i for i, pr in enumerate(projs) if pr[2] is not None]
        ghs = {}
        for i in lora:
            _, _, a, b_lora, h, mask = projs[i]
            gyl = gys[i].to(b_lora.dtype)
            grads[i][3] = gyl.t() @ h
            ghs[i] = (gyl @ b_lora) * ctx.scales[i]
        if a_cat is not None:  # stacked A: one GEMM for their gradients, one for their input gradient
            gh = torch.cat([ghs[i] for i in lora], 1)
            ga = gh.t() @ x.to(a_cat.dtype)
            for i, rows in zip(lora, _blocks(projs[i][2].shape[0] for i in lora)):
                grads[i][2] = ga[rows]
            if gx is not None:
                if a_cat.dtype == gx.dtype:
                    gx.addmm_(gh, a_cat)
                else:
                    gx += (gh @ a_cat).to(gx.dtype)
        else:
            for i in lora:
                _, _, a, _, _, mask = projs[i]
                gh, p = ghs[i], ctx.p_drops[i]
                if mask is not None:  # d/dx of (x * keep / (1 - p)) A^T: the scale on the rank-r gh, the mask once
                    gh = gh / (1.0 - p)
                    xl = dropout.dropped(x, mask, p, a.dtype)
                else:
                    xl = x.to(a.dtype)
                grads[i][2] = gh.t() @ xl
                if gx is not None:
                    if mask is not None:
                        dropout.add_dropped_(gx, gh @ a, mask, p)
                    elif a.dtype == gx.dtype:
                        gx.addmm_(gh, a)
                    else:
                        gx += (gh @ a).to(gx.dtype)
        return (gx, None, None, None, None, *[g for gr in grads for g in gr])


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


def split_lora_linears(parts_list, x: torch.Tensor, n_ctx: int = 0, mode: str | None = None,
                       idxs=None) -> tuple[torch.Tensor, ...]:
    """The fused projections of one 2-D input ``x`` (rows permuted context-first when ``n_ctx`` > 0; mode "in" takes
    one projection), one output each; under autocast they compute in the autocast dtype, as the projections' own
    forwards would."""
    idxs = idxs or [None] * len(parts_list)
    flat = [t for (w, b, a, bb, _, _), idx in zip(parts_list, idxs) for t in (w, b, a, bb, idx)]
    scales = tuple(pr[4] for pr in parts_list)
    p_drops = tuple(pr[5] for pr in parts_list)
    return _apply_as_autocast(_SplitLoRALinear, x, n_ctx, mode, scales, p_drops, *flat)


def split_lora_linear(parts, x: torch.Tensor, n_ctx: int = 0, mode: str | None = None, idx: torch.Tensor | None = None):
    """The fused projection of 2-D ``x`` (rows permuted context-first when ``n_ctx`` > 0)."""
    return split_lora_linears([parts], x, n_ctx, mode, [idx])[0]


def lora_linears(parts_list, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The fused dense projections of one input ``x`` of any leading shape."""
    ys = split_lora_linears(parts_list, x.reshape(-1, x.shape[-1]))
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)


def lora_linear(parts, x: torch.Tensor) -> torch.Tensor:
    """The fused dense projection of ``x`` of any leading shape."""
    return lora_linears([parts], x)[0]


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
