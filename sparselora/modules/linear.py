"""FusedLoRALinear: any frozen projection (plain or single-adapter PEFT LoRA) as one fused autograd node; FusedQKV:
q, k and v of one attention block as one node, since they read the same input.

Exact (same math as PEFT's forward), so they are installed on every projection SparseLoRA does not slice: the
dense rows of sparse layers and all of the dense layers run through them too.
"""

from __future__ import annotations

import torch
from torch import nn

from sparselora.modules.base import ForwardSwap, note_unfused
from sparselora.ops.fused import lora_linear, lora_linears
from sparselora.ops.lora_layer import lora_parts


class FusedLoRALinear:
    def __init__(self, module: nn.Module):
        self.module = module
        self.swap = ForwardSwap(module, self.forward)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        parts = None if (args or kwargs) else lora_parts(self.module)
        if parts is None:  # several adapters, adapter_names=..., a trainable base: PEFT's own forward
            note_unfused(self.module)
            return self.swap.original(x, *args, **kwargs)
        return lora_linear(parts, x)

    def remove(self) -> None:
        self.swap.restore()


class SharedInput:
    """The outputs that the first of q/k/v called on an input computed for the other two, until they are called on
    that same input (transformers calls q, k, v in a row on the block's normed hidden states)."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.pending: dict[str, torch.Tensor] = {}

    def take(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if x is not self.x or name not in self.pending:
            return None
        y = self.pending.pop(name)
        if not self.pending:
            self.x = None
        return y

    def put(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        self.x, self.pending = (x, outputs) if outputs else (None, {})

    def first(self, p: str, parts, modules: dict[str, nn.Module], x: torch.Tensor, run) -> torch.Tensor:
        """Projection ``p``'s output, called first on ``x``: ``run(names, parts_list)`` computes it together with
        those of its siblings in ``modules`` that fuse (``lora_parts`` not None), whose outputs are kept for them."""
        others = {q: lora_parts(m) for q, m in modules.items() if q != p}
        others = {q: g for q, g in others.items() if g is not None}
        names = [p, *others]
        ys = run(names, [parts, *others.values()])
        self.put(x, dict(zip(names[1:], ys[1:])))
        return ys[0]


class FusedQKV:
    """q, k and v of an attention block that SparseLoRA does not slice: the first called computes the fusable ones
    in one node (one input gradient accumulated in the GEMMs instead of an autograd sum of three; without dropout
    the LoRA A GEMMs stacked); the others return its results."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.shared = SharedInput()
        self.swaps = {p: ForwardSwap(m, self._make_forward(p)) for p, m in modules.items()}

    def _make_forward(self, p: str):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs:  # several adapters, adapter_names=...: PEFT's own forward
                note_unfused(self.modules[p])
                return self.swaps[p].original(x, *args, **kwargs)
            y = self.shared.take(p, x)
            if y is not None:
                return y
            parts = lora_parts(self.modules[p])
            if parts is None:
                note_unfused(self.modules[p])
                return self.swaps[p].original(x)
            return self.shared.first(p, parts, self.modules, x, lambda names, plist: lora_linears(plist, x))

        return forward

    def remove(self) -> None:
        for s in self.swaps.values():
            s.restore()
