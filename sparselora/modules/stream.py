"""The residual stream in context-first order through a run of attention-sparse layers.

Every sparse projection reads its rows context-first (`TokenSplit`). Without this, each sparse layer permutes its
attention input and FFN input and puts both outputs back: four hidden-width row gathers forward and four backward
per layer. Everything between the attention kernel's input and output is row-wise (norms, residual adds, the FFN),
so the stream can stay permuted from the run's first layer to its last; only q/k/v come out in sequence order (for
RoPE, caches and the attention kernel) and the attention output goes back in. One permutation at the run's entry
and one at its exit remain.
"""

from __future__ import annotations

import torch
from torch import nn


class PermutedStream:
    """Forward hooks on the first and last decoder layer of a run of consecutive layers with sparse attention."""

    def __init__(self, first: nn.Module, last: nn.Module, state):
        self.state = state
        self.handles = [first.register_forward_pre_hook(self._enter, with_kwargs=True),
                        last.register_forward_hook(self._exit)]

    def _enter(self, module, args, kwargs):
        if not self.state.stream_permuted:
            return None
        split = self.state.split
        if args:
            x = args[0]
            return (split.permute(x).view(x.shape), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": split.permute(x).view(x.shape)}

    def _exit(self, module, args, output):
        if not self.state.stream_permuted:
            return None
        split = self.state.split
        if isinstance(output, torch.Tensor):
            return split.unpermute(output.reshape(-1, output.shape[-1]))
        return (split.unpermute(output[0].reshape(-1, output[0].shape[-1])), *output[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def runs(layers: list[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive layer indices."""
    out: list[tuple[int, int]] = []
    for i in sorted(layers):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def wants_hidden_states(bound: dict, config) -> bool:
    """Whether a causal LM forward with these bound arguments returns every layer's hidden states."""
    extra = bound.get("kwargs", {})
    out = bound.get("output_hidden_states", extra.get("output_hidden_states"))
    return bool(getattr(config, "output_hidden_states", False) if out is None else out)
