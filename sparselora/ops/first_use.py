"""A kernel's first call on a machine checked against its torch reference, then trusted (or set aside) for the
process.

The Triton and fp8 kernels of the selection are tested on the GPUs we have (tests/test_ops.py), but a user's GPU,
driver or Triton may differ, and the selection's numbers never reach the loss, so a wrong kernel would cost
accuracy without an error anywhere. The first call outside CUDA-graph capture (an eager forward or a graph's
warm-up) runs both and compares; a kernel that raises or disagrees is replaced by the reference, said in one
warning line. Inside a capture before any check, the reference runs (no host sync is allowed there).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger("sparselora")
_verdict: dict[str, bool] = {}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def checked(name: str, fast: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor],
            rtol: float) -> torch.Tensor:
    """``fast()`` once it has matched ``reference()`` (relative Frobenius error <= ``rtol``) on its first call."""
    ok = _verdict.get(name)
    if ok is not None:
        return fast() if ok else reference()
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return reference()
    ref = reference()
    try:
        out = fast()
        err = _rel_err(out, ref)
        ok, why = err <= rtol, f"it differs from its torch reference by {err:.2e} (allowed {rtol:.0e})"
    except Exception as exc:  # a kernel that does not build or run here: the reference instead
        ok, why, out = False, f"it failed: {type(exc).__name__}: {exc}", None
    _verdict[name] = ok
    if not ok:
        logger.warning("sparselora: %s is set aside on this machine (%s); the torch reference runs instead, "
                       "slower, with the same result", name, why)
    return out if ok else ref


def reset() -> None:
    """Forget the verdicts (tests)."""
    _verdict.clear()
