"""FusedLoRALinear: any frozen projection (plain or single-adapter PEFT LoRA) as one fused autograd node.

Exact (same math as PEFT's forward), so it is installed on every projection SparseLoRA does not slice: the
dense rows of sparse layers and all of the dense layers run through it too.
"""

from __future__ import annotations

import torch
from torch import nn

from sparselora.modules.base import ForwardSwap, note_unfused
from sparselora.ops.fused import lora_linear
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
