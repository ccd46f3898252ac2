"""What a projection is to sparselora: a frozen ``nn.Linear`` or a PEFT ``lora.Linear`` (base layer + adapters).

One home for the PEFT-layer facts the ops rely on (its base weight, its active adapters, the states the sparse
path refuses, and when the fused op reproduces it), so the other ops hold math only.
"""

from __future__ import annotations

import torch
from torch import nn


def base_layer(module: nn.Module) -> nn.Linear:
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"sparselora can only slice nn.Linear base projections, found {type(base).__name__} "
            "(quantized or custom layers are not supported)"
        )
    return base


def check_lora_module(module: nn.Module) -> None:
    """Refuse PEFT layer states whose math the sparse path does not reproduce."""
    base_layer(module)
    if not hasattr(module, "lora_A"):
        return
    if getattr(module, "merged", False):
        raise ValueError(
            "a LoRA adapter is merged into the base weights; sparselora slices the base weight, so unmerge "
            "(model.unmerge_adapter()) before apply_sparselora"
        )
    for name in active_adapters(module):
        if getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"adapter {name!r} uses DoRA, which sparselora does not support; use plain LoRA")
        if name in getattr(module, "lora_variant", {}):
            raise ValueError(f"adapter {name!r} is a LoRA variant ({type(module.lora_variant[name]).__name__}); "
                             "sparselora supports plain LoRA only")


def active_adapters(module: nn.Module) -> list[str]:
    if getattr(module, "disable_adapters", False):
        return []
    active = module.active_adapters
    return [a for a in ([active] if isinstance(active, str) else active) if a in module.lora_A]


def base_weight_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    base = base_layer(module)
    return base.weight, base.bias


def lora_parts(module: nn.Module):
    """(weight, bias, A, B, scale, dropout p) when ``module`` is a frozen Linear or a plain single-adapter PEFT LoRA
    layer the fused op reproduces (A, B None: no active adapter); None otherwise, with the reason in
    `unfused_reason`. Under autocast the fused op casts as a linear layer does there (`ops.fused`). Dropout is
    reproduced in distribution, not draw for draw: its mask comes from `ops.dropout`, not from ``nn.Dropout``."""
    return _parts(module)[0]


def unfused_reason(module: nn.Module) -> str | None:
    """Why the fused op cannot reproduce ``module`` (None: it can)."""
    return _parts(module)[1]


def _parts(module: nn.Module):
    base = getattr(module, "base_layer", module)
    if type(base) is not nn.Linear:
        return None, f"its base layer is a {type(base).__name__}, not a plain nn.Linear"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None, "its base weight or bias is trainable (the fused op gives frozen weights no gradient)"
    if not hasattr(module, "lora_A"):
        return (base.weight, base.bias, None, None, 1.0, 0.0), None
    if getattr(module, "merged", False):
        return None, "a LoRA adapter is merged into it"
    active = active_adapters(module)
    if not active:
        return (base.weight, base.bias, None, None, 1.0, 0.0), None
    if len(active) > 1:
        return None, f"{len(active)} adapters are active at once ({', '.join(active)})"
    name = active[0]
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Identity):
        p = 0.0
    elif type(drop) is nn.Dropout:
        p = float(drop.p) if drop.training else 0.0
    else:
        return None, f"its LoRA dropout is a {type(drop).__name__}, not nn.Dropout"
    if module.lora_B[name].bias is not None:
        return None, "its LoRA B has a bias (lora_bias=True)"
    if p >= 1.0:
        return None, f"its LoRA dropout drops everything (p={p:g})"
    if getattr(module, "use_dora", {}).get(name, False) or name in getattr(module, "lora_variant", {}):
        return None, f"adapter {name!r} is DoRA or another LoRA variant"
    return (base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
            float(module.scaling[name]), p), None
