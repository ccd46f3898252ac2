"""LoRA dropout for the fused projection: a keep mask that is drawn, applied and applied again in the backward.

Every LoRA projection drops entries of its own full-width input (PEFT's ``lora_dropout``, 0.05 by default). With
torch ops that is a float32 ``rand_like`` over the input, a compare, a multiply, a bool mask held until the
backward, and there two more full-width passes: on an H200 ~250 us a 4,224 x 4,096 projection, ~27 ms of a
Llama-3-8B step on q/k/v/o. On CUDA with Triton the mask is instead a pure function of one seed and the element's
position (Philox, four draws per counter): one kernel writes the dropped input forward, the backward regenerates
it and adds the masked input gradient in one pass, and nothing of the input's size is kept. The seed is drawn
from torch's CUDA generator on the device, so every CUDA-graph replay gets a new one and gradient checkpointing,
which restores the generator's state, recomputes the same mask (what ``nn.Dropout`` gives). Elsewhere the mask
is a bool tensor from torch's RNG (same distribution; the CPU tests compare against PEFT's branch with it).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_BLOCK = 4096  # elements a program: 1,024 Philox counters of 4 draws
_MAX_NUMEL = 4 * 2**31  # counters are 32-bit: beyond this masks would repeat, so such inputs take the torch path


if triton is not None:

    @triton.jit
    def _keep_tile(seed_ptr, pid, p, BLOCK: tl.constexpr):
        """Element offsets of program ``pid``'s tile (BLOCK / 4 x 4) and which of them are kept."""
        ctr = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr), ctr.to(tl.uint32))
        lane = tl.arange(0, 4)[None, :]
        u = tl.where(lane == 0, r0[:, None], tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
        offs = ctr.to(tl.int64)[:, None] * 4 + lane
        return offs, u >= p

    @triton.jit
    def _dropped_kernel(x, out, seed_ptr, n, p, BLOCK: tl.constexpr):
        offs, keep = _keep_tile(seed_ptr, tl.program_id(0), p, BLOCK)
        m = offs < n
        v = tl.load(x + offs, mask=m, other=0.0)
        tl.store(out + offs, tl.where(keep, v, tl.zeros_like(v)).to(out.dtype.element_ty), mask=m)

    @triton.jit
    def _add_dropped_kernel(out, t, seed_ptr, n, p, BLOCK: tl.constexpr, ACC: tl.constexpr):
        offs, keep = _keep_tile(seed_ptr, tl.program_id(0), p, BLOCK)
        m = offs < n
        o = tl.load(out + offs, mask=m, other=0.0).to(ACC)
        v = tl.load(t + offs, mask=m, other=0.0).to(ACC)
        tl.store(out + offs, (o + tl.where(keep, v, 0.0)).to(out.dtype.element_ty), mask=m)


def _seeded(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda and x.numel() < _MAX_NUMEL


def draw(x: torch.Tensor, p: float) -> torch.Tensor:
    """A new dropout mask for ``x``: on CUDA a seed (one int64 on the device), elsewhere the bool keep mask."""
    if _seeded(x):
        return torch.randint(0, 2**62, (1,), device=x.device, dtype=torch.int64)
    return torch.rand_like(x, dtype=torch.float32) >= p


def dropped(x: torch.Tensor, mask: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` with the dropped entries zeroed, in ``dtype`` (dropout's 1 / (1 - p) is left to the caller, who
    puts it on the much smaller rank-r product)."""
    if mask.dtype == torch.bool:
        return x.to(dtype) * mask
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    _dropped_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, out, mask, x.numel(), p, BLOCK=_BLOCK)
    return out


def add_dropped_(out: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``out += dropped(t)`` in place, in ``out``'s dtype: the input gradient of the dropped branch."""
    if mask.dtype == torch.bool:
        return out.add_(t.mul_(mask).to(out.dtype))
    assert out.is_contiguous() and out.shape == t.shape
    t = t.contiguous()
    acc = tl.float64 if torch.float64 in (out.dtype, t.dtype) else tl.float32  # bf16 sums in float32
    _add_dropped_kernel[(triton.cdiv(t.numel(), _BLOCK),)](out, t, mask, t.numel(), p, BLOCK=_BLOCK, ACC=acc)
    return out


def keep_of(mask: torch.Tensor, like: torch.Tensor, p: float) -> torch.Tensor:
    """The bool keep mask that ``mask`` stands for, shaped like ``like`` (for references and tests)."""
    if mask.dtype == torch.bool:
        return mask
    return dropped(torch.ones_like(like, dtype=torch.float32), mask, p, torch.float32) != 0
