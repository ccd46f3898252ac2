"""Channel scores of the SVD estimator without forming (tokens x channels) activations.

The estimate of a projection is z B with z = x A (tokens x r). Its column norms are exact from the r x r Gram
matrix: ||z B_j||^2 = B_j^T (z^T z) B_j. The FFN score ||silu(z_g B_g) * (z_u B_u)||_j is not bilinear, so on
CUDA a Triton kernel streams tokens through registers and accumulates it per channel; on CPU it is computed
in token chunks. Either way the score costs a small fraction of the layer it prunes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparselora.ops.first_use import checked

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def col_norms_sq(z: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Squared column norms of z @ b (+ bias) over rows, via the Gram matrix and the column sums of z:
    ||z b_j + c_j||^2 = b_j^T (z^T z) b_j + 2 c_j (1^T z) b_j + n c_j^2."""
    g = z.t() @ z
    out = ((g @ b) * b).sum(0)
    if bias is not None:
        c = bias.to(out.dtype)
        out = out + 2 * c * (z.sum(0) @ b) + z.shape[0] * c * c
    return out.clamp_min(0)


if triton is not None:

    @triton.jit
    def _ffn_score_kernel(zg, zu, bg, bu, out, N, I, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
        pid = tl.program_id(0)
        cols = pid * BLOCK_J + tl.arange(0, BLOCK_J)
        rr = tl.arange(0, R)
        cmask = cols < I
        b_g = tl.load(bg + rr[:, None] * I + cols[None, :], mask=cmask[None, :], other=0.0)
        b_u = tl.load(bu + rr[:, None] * I + cols[None, :], mask=cmask[None, :], other=0.0)
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for t0 in range(0, N, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            rmask = rows < N
            a_g = tl.load(zg + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
            a_u = tl.load(zu + rows[:, None] * R + rr[None, :], mask=rmask[:, None], other=0.0)
            g = tl.dot(a_g, b_g, input_precision="ieee")
            u = tl.dot(a_u, b_u, input_precision="ieee")
            h = g * tl.sigmoid(g) * u
            acc += tl.sum(h * h, axis=0)
        tl.store(out + cols, acc, mask=cmask)


    @triton.jit
    def _silu_mul_sq_kernel(g, u, out, N, I, stride_g, stride_u, scale, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
        cmask = cols < I
        acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
        for t0 in range(0, N, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            m = (rows < N)[:, None] & cmask[None, :]
            a = tl.load(g + rows[:, None] * stride_g + cols[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(u + rows[:, None] * stride_u + cols[None, :], mask=m, other=0.0).to(tl.float32)
            h = a * tl.sigmoid(a) * b
            acc += tl.sum(h * h, axis=0)
        tl.store(out + cols, acc * scale, mask=cmask)


def silu_mul_sq_sum(g: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale`` times the sum over rows of (silu(g) * u)^2 per channel, in float32: the sampled selector's FFN
    score in one pass over g and u (2-D; views of one [g | u] buffer are fine), without writing the activation."""
    def reference():
        f32 = [t if t.dtype == torch.float32 else t.float() for t in (g, u)]  # no op where they already are
        out = (F.silu(f32[0]) * f32[1]).pow_(2).sum(0)
        return out if scale == 1.0 else out.mul_(scale)

    if not (g.is_cuda and triton is not None and g.stride(1) == 1 and u.stride(1) == 1):
        return reference()
    return checked(SCORE_KERNEL, lambda: _silu_mul_sq_triton(g, u, scale), reference, 1e-4)


SCORE_KERNEL = "the Triton FFN score kernel"  # its name in `ops.first_use`


def _silu_mul_sq_triton(g: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    n, i = g.shape
    out = torch.empty(i, device=g.device, dtype=torch.float32)
    _silu_mul_sq_kernel[(triton.cdiv(i, 128),)](g, u, out, n, i, g.stride(0), u.stride(0), float(scale),
                                                BLOCK_T=32, BLOCK_J=128)
    return out


def _pad_rank(t: torch.Tensor, dim: int, r: int) -> torch.Tensor:
    pad = r - t.shape[dim]
    if pad == 0:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim).contiguous()


def ffn_scores_sq(zg: torch.Tensor, zu: torch.Tensor, bg: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
    """sum over tokens of (silu(zg @ bg) * (zu @ bu))^2 per channel, in float32."""
    if zg.is_cuda and triton is not None:
        r = max(16, triton.next_power_of_2(zg.shape[1]))  # tl.dot needs K >= 16
        zg, zu = _pad_rank(zg.float(), 1, r), _pad_rank(zu.float(), 1, r)
        bg, bu = _pad_rank(bg.float(), 0, r), _pad_rank(bu.float(), 0, r)
        n, i = zg.shape[0], bg.shape[1]
        out = torch.empty(i, device=zg.device, dtype=torch.float32)
        _ffn_score_kernel[(triton.cdiv(i, 128),)](zg, zu, bg, bu, out, n, i, R=r, BLOCK_T=64, BLOCK_J=128)
        return out
    out = None
    for s in range(0, zg.shape[0], 1024):  # bounded memory on CPU
        h = F.silu(zg[s : s + 1024] @ bg) * (zu[s : s + 1024] @ bu)
        part = h.pow(2).sum(0)
        out = part if out is None else out + part
    return out
