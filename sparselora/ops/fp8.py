"""A frozen weight in fp8 (e4m3, one scale per row) for the sampled selector's scoring GEMM.

The sampled selector runs the FFN's gate and up projections on a few hundred context rows of every batch, only to
rank channels. At that height the GEMM is compute-bound (Llama-3-8B: ~94 us of a layer's ~134 us of selection on
an H200), and fp8 tensor cores do it at twice the bf16 rate from half the weight bytes. Ranking needs no more
precision: on real GSM8K batches the kept channels' mass is unchanged within 0.001 (docs/accuracy-notes.md). Only
the score uses these numbers; the forward and its gradients stay in the model's dtype.

On a CPU (and in tests) the same quantized numbers are multiplied in float32 (an emulation: the fp8 GEMM also
accumulates in float32), so `benchmarks/recall.py` measures on CPU what the GPU ranks by.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_ALIGN = 16  # torch._scaled_mm wants every dimension a multiple of 16 (widths: checked by `fp8_fits`)


def fp8_supported(device: torch.device | str) -> bool:
    """fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) and torch's scaled GEMM."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_fits(out_features: int, in_features: int) -> bool:
    return out_features % _ALIGN == 0 and in_features % _ALIGN == 0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, float32 scale per row (rows, 1)) with t ~= values * scale, each row scaled to e4m3's range."""
    scale = t.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


class Fp8Weight:
    """x W^T (+ bias) of a frozen (out, in) weight from its e4m3 copy; ``x`` is quantized per row at each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        q, scale = quantize_rows(weight.detach())
        self.q, self.scale = q, scale.view(1, -1)  # (out, in) row-major; (1, out)
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.nbytes = q.numel() + 4 * scale.numel()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x)
        if x.is_cuda:
            m = x.shape[0]
            if m % _ALIGN:  # a sample smaller than its row count (a short batch): zero rows up to the alignment
                pad = _ALIGN - m % _ALIGN
                xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
                xs = torch.cat([xs, xs.new_ones(pad, 1)])
            y = torch._scaled_mm(xq, self.q.t(), scale_a=xs, scale_b=self.scale, out_dtype=torch.bfloat16)[:m]
        else:
            y = (xq.float() * xs) @ (self.q.float() * self.scale.t()).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y
