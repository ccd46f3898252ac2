"""Swapping ``forward`` on one module instance, reversibly."""

from __future__ import annotations

from torch import nn

_MISSING = object()


class ForwardSwap:
    def __init__(self, module: nn.Module, new_forward):
        self.module = module
        self.saved = module.__dict__.get("forward", _MISSING)  # an instance-level forward set by someone else
        self.original = module.forward
        module.forward = new_forward

    def restore(self) -> None:
        if self.saved is _MISSING:
            del self.module.forward
        else:
            self.module.forward = self.saved
