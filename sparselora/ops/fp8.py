"""A frozen weight in fp8 (e4m3, one scale per row) for the sampled selector's scoring GEMM.

The sampled selector runs the FFN's gate and up projections on a few hundred context rows of every batch, only to
rank channels. At that height the GEMM is compute-bound (Llama-3-8B: ~94 us of a layer's ~134 us of selection on
an H200), and fp8 tensor cores have twice the bf16 rate and read half the weight bytes (the speed-up is not yet
measured). Ranking needs no more precision: on real GSM8K batches the kept channels' mass is unchanged within
0.001 (docs/accuracy-notes.md). Only
the score uses these numbers; the forward and its gradients stay in the model's dtype.

On a CPU (and in tests) the same quantized numbers are multiplied in float32 (an emulation: the fp8 GEMM also
accumulates in float32), so `benchmarks/recall.py` measures on CPU what the GPU ranks by.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from sparselora.ops.first_use import checked

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FP8_GEMM = "the fp8 scoring GEMM"  # its name in `ops.first_use`
FP8_CHECK_RTOL = 0.2
_ALIGN = 16  # torch._scaled_mm wants every dimension a multiple of 16 (widths: checked by `fp8_fits`)


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) and torch's scaled GEMM."""
    return _fp8_supported(torch.device(device))


@functools.lru_cache(maxsize=16)
def _fp8_supported(device: torch.device) -> bool:  # asked by every sparse FFN forward: once per device
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_fits(out_features: int, in_features: int) -> bool:
    return out_features % _ALIGN == 0 and in_features % _ALIGN == 0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row (rows, 1)) with t ~= values * scale, each row scaled to e4m3's range."""
    scale = t.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x, q, scale, K, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < K
        v = tl.load(x + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(v), 0), 1e-12) / 448.0
        tl.store(q + row * K + offs, (v / s).to(tl.float8e4nv), mask=inside)
        tl.store(scale + row, s)


def _quantize_rows_padded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a CUDA matrix in one kernel (one program per row), rows zero-padded to a multiple of 16
    (scale 1) for the scaled GEMM; torch ops where Triton is missing."""
    m, k = x.shape
    mp = -(-m // _ALIGN) * _ALIGN
    if triton is None or x.stride(1) != 1 or k > 32768:
        xq, xs = quantize_rows(x)
        if mp > m:
            xq = torch.cat([xq, xq.new_zeros(mp - m, k)])
            xs = torch.cat([xs, xs.new_ones(mp - m, 1)])
        return xq, xs
    alloc = torch.zeros if mp > m else torch.empty
    xq = alloc(mp, k, device=x.device, dtype=E4M3)
    xs = torch.ones(mp, 1, device=x.device, dtype=torch.float32) if mp > m else torch.empty(
        m, 1, device=x.device, dtype=torch.float32)
    _quantize_rows_kernel[(m,)](x, xq, xs, k, x.stride(0), BLOCK=triton.next_power_of_2(k),
                                num_warps=8 if k > 4096 else 4)
    return xq, xs


class Fp8Weight:
    """x W^T (+ bias) of a frozen (out, in) weight from its e4m3 copy; ``x`` is quantized per row at each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        q, scale = quantize_rows(weight.detach())
        self.q, self.scale = q, scale.view(1, -1)  # (out, in) row-major; (1, out)
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.nbytes = q.numel() + 4 * scale.numel()

    @classmethod
    def side_by_side(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None) -> "Fp8Weight":
        """One copy of several projections of the same input ([gate; up]): one GEMM gives [gate x | up x]. A
        missing bias among present ones counts as zeros."""
        biases = biases or [None] * len(weights)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        return cls(torch.cat(weights), bias)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x)

    def checked(self, x: torch.Tensor, exact: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``self(x)`` if the fp8 GEMM has matched the exact product ``exact(x)`` on its first call in this process,
        else ``exact(x)`` (`ops.first_use.checked`). The bound, 20% relative, is far above e4m3's own error (3.0-3.6%
        on the sampled rows of SmolLM2-135M and Qwen2.5-Coder-0.5B, every layer) and far below a broken kernel's."""
        return checked(FP8_GEMM, lambda: self(x), lambda: exact(x), FP8_CHECK_RTOL)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            xq, xs = _quantize_rows_padded(x)  # a sample smaller than 16-aligned (a short batch): zero rows added
            y = torch._scaled_mm(xq, self.q.t(), scale_a=xs, scale_b=self.scale, out_dtype=torch.bfloat16)
            y = y[: x.shape[0]]
        else:
            xq, xs = quantize_rows(x)
            y = (xq.float() * xs) @ (self.q.float() * self.scale.t()).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
