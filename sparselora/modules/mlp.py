"""SparseMLP: the SiLU-gated FFN of one block, sliced to kept intermediate channels for context tokens."""

from __future__ import annotations

import torch
from torch import nn

from sparselora.models.registry import FFN_PROJS, module_name
from sparselora.modules.base import ForwardSwap
from sparselora.ops import ffn_context
from sparselora.ops.fused import ffn_parts, split_ffn
from sparselora.ops.fused_kernels import silu_mul
from sparselora.ops.lora_layer import base_weight_bias, check_lora_module
from sparselora.selection import SELECTORS, RunningScore, select_ffn, select_ffn_from_activations


class SparseMLP:
    def __init__(self, mlp: nn.Module, layer: int, sparsity: float, state):
        for p in FFN_PROJS:
            check_lora_module(getattr(mlp, module_name(p)))
        self.mlp, self.layer, self.sparsity, self.state = mlp, layer, sparsity, state
        self.kept: torch.Tensor | None = None  # channels kept in the last sparse forward
        cfg = state.config
        self.running = None  # the sampled selector's scores averaged over batches
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
        keep = select_ffn(cfg.selector, self.sparsity, xc, mlp.gate_proj, mlp.up_proj, factors, n,
                          cfg.ffn_rows(self.layer), self.running)
        self.kept = keep
        parts = ffn_parts(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if parts is not None:  # no adapter on the FFN (LoRA on attention only): one fused node for all rows
            return split.stream_of(split_ffn(parts, xp, split.num_context, keep), permuted)
        yc = ffn_context(mlp.gate_proj, mlp.up_proj, mlp.down_proj, xc, keep)
        yd = mlp.down_proj(silu_mul(mlp.gate_proj(xd), mlp.up_proj(xd))) if xd.shape[0] else yc.new_empty(0, yc.shape[-1])
        return split.scatter(yc, yd, permuted)

    def _forward_labelled(self, split, xc: torch.Tensor, xd: torch.Tensor, permuted: bool) -> torch.Tensor:
        """Dense rows first: their activations, restricted to the labelled rows, rank the context channels."""
        mlp = self.mlp
        hd = silu_mul(mlp.gate_proj(xd), mlp.up_proj(xd))
        keep = select_ffn_from_activations(self.sparsity, hd[: split.num_labelled].detach())
        self.kept = keep
        yc = ffn_context(mlp.gate_proj, mlp.up_proj, mlp.down_proj, xc, keep)
        return split.scatter(yc, mlp.down_proj(hd), permuted)

    def remove(self) -> None:
        self.swap.restore()
