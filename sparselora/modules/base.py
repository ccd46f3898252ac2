"""Swapping ``forward`` on one module instance, reversibly."""

from __future__ import annotations

from torch import nn


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
