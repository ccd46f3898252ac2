"""Swapping ``forward`` on one module instance, reversibly; saying once when a projection leaves the fused op."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger("sparselora")
_said: set[str] = set()


def note_unfused(module: nn.Module) -> None:
    """Say once per reason and process that projections run PEFT's own forward instead of the fused op (call it
    when `lora_parts` gave None or the call had extra arguments): the same numbers, several times the kernels (a
    path that silently stayed unfused once cost every GPU run its speed)."""
    from sparselora.ops.lora_layer import unfused_reason

    reason = unfused_reason(module) or "it was called with extra arguments (e.g. adapter_names)"
    if reason not in _said:
        _said.add(reason)
        logger.warning("sparselora: a projection runs its own (PEFT) forward instead of the fused op, which is "
                       "slower: %s", reason)


class ForwardSwap:
    def __init__(self, module: nn.Module, new_forward):
        self.module = module
        # an instance-level forward set by someone else; a flag, not a sentinel object, so that a deep copy of a
        # patched model (copy.deepcopy makes a new sentinel) still restores the class forward
        self.had_own = "forward" in module.__dict__
        self.saved = module.__dict__.get("forward")
        self.original = module.forward
        module.forward = new_forward

    def restore(self) -> None:
        if not self.had_own:
            del self.module.forward
        else:
            self.module.forward = self.saved
