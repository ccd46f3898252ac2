"""SparseAttention: q/k/v output channels and o_proj input columns of one block, sliced for context tokens.

A forward pre-hook on the attention module picks the channels from its input once per call; the four
projections then route context rows through the sparse ops and all other rows through their own forward.
RoPE, the attention kernel, Qwen3's q/k norms and the LoRA branches are untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sparselora.models.registry import ATTN_PROJS, module_name
from sparselora.modules.base import ForwardSwap, note_unfused
from sparselora.ops import proj_in_sparse, proj_out_sparse
from sparselora.modules.linear import SharedInput
from sparselora.ops.fused import lora_linear, lora_linears, split_lora_linear, split_lora_linears
from sparselora.ops.lora_layer import base_weight_bias, check_lora_module, lora_parts
from sparselora.selection import SELECTORS, labelled_rows, select_attention

class _Inputs(NamedTuple):
    """The attention input of the current call, shared by q, k and v: as given, context rows, dense rows, and
    all rows permuted context-first."""

    x: torch.Tensor
    ctx: torch.Tensor
    dense: torch.Tensor
    permuted: torch.Tensor


class SparseAttention:
    def __init__(self, attn: nn.Module, layer: int, sparsity: float, state):
        self.projs = {p: getattr(attn, module_name(p)) for p in ATTN_PROJS}
        for m in self.projs.values():
            check_lora_module(m)
        self.attn, self.layer, self.sparsity, self.state = attn, layer, sparsity, state
        self.kept: dict[str, torch.Tensor] | None = None
        self._inputs: _Inputs | None = None  # of the current call; dropped by o_proj
        self.shared = SharedInput()  # q/k/v outputs computed by the first of them called
        self.swaps = {p: ForwardSwap(m, self._make_forward(p)) for p, m in self.projs.items()}
        self.handle = attn.register_forward_pre_hook(self._select, with_kwargs=True)

    def _select(self, module, args, kwargs):
        self._inputs = None
        self.shared.put(None, {})
        self.kept = None  # set again below when this call runs sparse: never a stale channel set
        split = self.state.split if self.state.active else None
        permuted = self.state.permuted_at(self.layer)
        if split is None or self.state.nothing_to_rank:  # this batch runs dense (in sequence order: not permuted)
            return None
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        xp = split.stream_rows(x, permuted)
        xc, xd = xp[: split.num_context], xp[split.num_context :]
        cfg, est = self.state.config, self.state.estimator
        xs, sel = xc, SELECTORS[cfg.selector]
        if sel.scores_labelled:
            xs = labelled_rows(xd, split.num_labelled)
        factors = est.stacked(self.layer, "qkv", xs.device) if sel.needs_factors else None
        orig = {p: s.original for p, s in self.swaps.items()}
        biases = [base_weight_bias(self.projs[p])[1] for p in "qkv"]  # Qwen2's q/k/v biases
        self.kept = select_attention(
            cfg.selector, self.sparsity, xs, self.state.arch, cfg.rope_pairs, orig["q"], orig["k"], orig["v"], factors,
            biases, cfg.sample_rows,
        )
        self._inputs = _Inputs(x, xc, xd, xp)
        return None

    def _fused_o(self, parts, x: torch.Tensor, split) -> torch.Tensor:
        """o on rows permuted context-first; its output stays in the stream's order."""
        y = split_lora_linear(parts, split.permute(x), split.num_context, "in", self.kept["o"])
        return split.stream_of(y, self.state.permuted_at(self.layer))

    def _fused_qkv(self, p: str, parts, x: torch.Tensor, split) -> torch.Tensor:
        """q/k/v in one fused node (those that fuse), called by the first of them; the others take their outputs
        from `shared`. Sparse (``split`` given) they run on rows permuted context-first (one permutation for the
        three) and come out in sequence order, for RoPE and the attention kernel."""
        def run(names, plist):
            if split is None:
                return lora_linears(plist, x)
            xp = self._inputs.permuted if x is self._inputs.x else split.permute(x)
            return [split.unpermute(y) for y in split_lora_linears(plist, xp, split.num_context, "out",
                                                                    [self.kept[q] for q in names])]

        return self.shared.first(p, parts, {q: self.projs[q] for q in "qkv"}, x, run)

    def _make_forward(self, p: str):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            inputs = self._inputs
            if p != "o" and not (args or kwargs):
                y = self.shared.take(p, x)
                if y is not None:
                    return y
            parts = None if (args or kwargs) else lora_parts(self.projs[p])
            if parts is None:
                note_unfused(self.projs[p])
            if inputs is None:
                if parts is None:
                    return self.swaps[p].original(x, *args, **kwargs)
                return lora_linear(parts, x) if p == "o" else self._fused_qkv(p, parts, x, None)
            split = self.state.split
            if parts is not None:
                if p != "o":
                    return self._fused_qkv(p, parts, x, split)
                self._inputs = None
                return self._fused_o(parts, x, split)
            xc, xd = (inputs.ctx, inputs.dense) if x is inputs.x else split.gather(x)
            if p == "o":
                yc = proj_in_sparse(self.projs[p], xc, self.kept["o"])
                self._inputs = None  # the call is over; drop the references
            else:
                yc = proj_out_sparse(self.projs[p], xc, self.kept[p])
            yd = self.swaps[p].original(xd) if xd.shape[0] else yc.new_empty(0, yc.shape[-1])
            return split.scatter(yc, yd, p == "o" and self.state.permuted_at(self.layer))

        return forward

    def remove(self) -> None:
        self.handle.remove()
        for s in self.swaps.values():
            s.restore()
