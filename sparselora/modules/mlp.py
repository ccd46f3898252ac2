"""SparseMLP: the SiLU-gated FFN of one block, sliced to kept intermediate channels for context tokens."""

from __future__ import annotations

import torch
from torch import nn

from sparselora.models.registry import FFN_PROJS, module_name
from sparselora.modules.base import ForwardSwap, logger
from sparselora.ops import ffn_context
from sparselora.ops.fp8 import Fp8Weight, fp8_fits, fp8_supported
from sparselora.ops.fused import ffn_parts, split_ffn
from sparselora.ops.fused_kernels import silu_mul
from sparselora.ops.lora_layer import base_weight_bias, check_lora_module
from sparselora.selection import SELECTORS, RunningScore, select_ffn, select_ffn_from_activations


_said_fp8: set[str] = set()


def note_fp8(w: Fp8Weight) -> None:
    """Say once per process that the sampled rows are scored in fp8, and what the copies cost."""
    if "fp8" not in _said_fp8:
        _said_fp8.add("fp8")
        logger.info("sparselora: the sampled selector scores FFN rows from fp8 copies of gate/up (%.0f MiB per sparse "
                    "layer; sample_fp8=False turns it off)", w.nbytes / 2**20)


class SparseMLP:
    def __init__(self, mlp: nn.Module, layer: int, sparsity: float, state):
        for p in FFN_PROJS:
            check_lora_module(getattr(mlp, module_name(p)))
        self.mlp, self.layer, self.sparsity, self.state = mlp, layer, sparsity, state
        self.kept: torch.Tensor | None = None  # channels kept in the last sparse forward
        cfg = state.config
        self.running = None  # the sampled selector's scores averaged over batches
        self.fp8: Fp8Weight | None = None  # fp8 [gate; up] for the sampled rows' scores (`_fp8_gate_up`)
        if cfg.selector == "sampled" and cfg.score_momentum > 0:
            self.running = RunningScore(cfg.score_momentum)
            state.running_scores[layer] = self.running
        self.swap = ForwardSwap(mlp, self.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.state.split if self.state.active else None
        self.kept = None  # set again below when this forward runs sparse: never a stale channel set
        if split is None or self.state.nothing_to_rank:  # this batch runs dense
            return self.swap.original(x)
        mlp, cfg = self.mlp, self.state.config
        sel = SELECTORS[cfg.selector]
        permuted = self.state.permuted_at(self.layer)
        xp = split.stream_rows(x, permuted)
        xc, xd = xp[: split.num_context], xp[split.num_context :]
        if sel.scores_labelled:
            return self._forward_labelled(split, xc, xd, permuted)
        factors = None
        if sel.needs_factors:
            factors = self.state.estimator.stacked(self.layer, ("gate", "up"), xc.device)
        n = base_weight_bias(mlp.gate_proj)[0].shape[0]
        if self.state.ffn_probe is not None:  # allocate_sample_rows measuring (frozen, no_grad)
            self.state.ffn_probe(self, xc, n)
        parts = ffn_parts(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        keep = select_ffn(cfg.selector, self.sparsity, xc, mlp.gate_proj, mlp.up_proj, factors, n,
                          cfg.ffn_rows(self.layer), self.running, self._fp8_gate_up(parts, xc.device))
        self.kept = keep
        if parts is not None:  # no adapter on the FFN (LoRA on attention only): one fused node for all rows
            return split.stream_of(split_ffn(parts, xp, split.num_context, keep), permuted)
        yc = ffn_context(mlp.gate_proj, mlp.up_proj, mlp.down_proj, xc, keep)
        yd = mlp.down_proj(silu_mul(mlp.gate_proj(xd), mlp.up_proj(xd))) if xd.shape[0] else yc.new_empty(0, yc.shape[-1])
        return split.scatter(yc, yd, permuted)

    def _fp8_gate_up(self, parts, device):
        """[gate x | up x] from the fp8 copy of [gate; up] that scores the sampled rows
        (`SparseLoRAConfig.sample_fp8`), built at the first sparse forward on a GPU with fp8 tensor cores and checked
        once against the exact product (`Fp8Weight.checked`); None where it does not apply: another selector, an
        adapter on the FFN (the scores include it, in the model's dtype), a CPU or an older GPU."""
        cfg = self.state.config
        if not (cfg.sample_fp8 and cfg.selector == "sampled" and parts is not None and fp8_supported(device)):
            return None
        wg, bg, wu, bu = parts[:4]
        if device.type == "cuda" and not fp8_fits(2 * wg.shape[0], wg.shape[1]):
            return None
        if self.fp8 is None or self.fp8.q.device != device:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("sparselora: a sparse FFN first ran inside CUDA graph capture; run a warm-up "
                                   "forward first (CUDAGraphStep does)")
            self.fp8 = Fp8Weight.side_by_side([wg, wu], [bg, bu])
            note_fp8(self.fp8)
        mlp = self.mlp
        return lambda t: self.fp8.checked(t, lambda r: torch.cat([mlp.gate_proj(r), mlp.up_proj(r)], 1))

    def _forward_labelled(self, split, xc: torch.Tensor, xd: torch.Tensor, permuted: bool) -> torch.Tensor:
        """Dense rows first: their activations, restricted to the labelled rows, rank the context channels."""
        mlp = self.mlp
        hd = silu_mul(mlp.gate_proj(xd), mlp.up_proj(xd))
        keep = select_ffn_from_activations(self.sparsity, hd[: split.num_labelled].detach())
        self.kept = keep
        yc = ffn_context(mlp.gate_proj, mlp.up_proj, mlp.down_proj, xc, keep)
        return split.scatter(yc, mlp.down_proj(hd), permuted)

    def remove(self) -> None:
        self.fp8 = None
        self.swap.restore()
