"""The root of sparselora's own errors.

Every error class the library raises derives from `SparseLoRAError`, and also from the builtin it always was
(`ValueError` for bad input, `RuntimeError` for a setup that cannot work), so ``except sparselora.SparseLoRAError``
catches all of them and existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class SparseLoRAError(Exception):
    """Base class of the errors sparselora raises itself."""
