"""The training-free SVD estimator: rank-r factors of frozen projections, built once and cached.

For a projection y = x W^T with W of shape (out, in), the factors are A = U_r sqrt(S_r) (in, r) and
B = sqrt(S_r) V_r^T (r, out) of W^T = U S V^T, so x A B is the best rank-r estimate of the projection.
They are computed in float32 from the frozen base weights (no data, no training) and stored with safetensors
under ``estimator_dir``, in a file named by a fingerprint of those weights: a different model never finds
the file, and a file whose recorded fingerprint does not match is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparselora.errors import SparseLoRAError
from sparselora.io import atomic_write, file_lock

ESTIMATOR_VERSION = "1"


class EstimatorCacheError(SparseLoRAError, ValueError):
    pass


def low_rank_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with x @ A @ B the rank-``rank`` truncated SVD of x @ weight.T, in float32.

    Computed from the eigen-decomposition of the (in x in) Gram matrix in float64: exact top singular vectors,
    and far cheaper than a full SVD of a (14336 x 4096) FFN weight.
    """
    out_dim, in_dim = weight.shape
    if rank > min(out_dim, in_dim):
        raise ValueError(f"estimator_rank {rank} exceeds the dims of a ({out_dim} x {in_dim}) projection")
    w = weight.detach().to(torch.float64)
    evals, evecs = torch.linalg.eigh(w.T @ w)  # ascending
    evals = evals.flip(0)[:rank].clamp_min(0)
    u = evecs.flip(1)[:, :rank]  # (in, r): right singular vectors of W = left ones of W^T
    s = evals.sqrt()
    a = u * s.sqrt()
    b = (w @ u).T / s.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[:, None]  # sqrt(S) V^T = S^-1/2 U^T W^T
    return a.float().contiguous(), b.float().contiguous()


def stack_factors(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.cat([a for a, _ in pairs], 1).contiguous(), [b for _, b in pairs]


def fingerprint(named_weights: dict[str, torch.Tensor]) -> str:
    """A hash of the weights: names, shapes, dtypes and an even sample of up to 2^16 values per tensor.

    Sampling keeps hashing an 8B model to well under a second while still telling any two checkpoints
    (fine-tuned or different models) apart.
    """
    h = hashlib.sha256(ESTIMATOR_VERSION.encode())
    for name in sorted(named_weights):
        w = named_weights[name].detach()
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 65536)
        sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


class Estimator:
    """Factors per (layer, projection name), on the model's device."""

    def __init__(self, factors: dict[str, torch.Tensor], rank: int):
        self.factors = factors
        self.rank = rank
        self._stacked: dict = {}

    def get(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors[f"{layer}.{proj}.A"], self.factors[f"{layer}.{proj}.B"]

    def stacked(self, layer: int, projs, device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(A's side by side, [B's]) of several projections sharing one input: one matmul scores them all. With
        ``device`` (the input's), the factors follow a model moved after `apply_sparselora` (the Trainer moves it
        to the GPU only when training starts): all of them move once, on first use there."""
        if device is not None and self.factors and next(iter(self.factors.values())).device != device:
            self.factors = {k: v.to(device) for k, v in self.factors.items()}
            self._stacked.clear()
        key = (layer, tuple(projs))
        if key not in self._stacked:
            self._stacked[key] = stack_factors([self.get(layer, p) for p in projs])
        return self._stacked[key]

    @classmethod
    def build(
        cls,
        weights: dict[tuple[int, str], torch.Tensor],
        rank: int,
        cache_dir: str | Path | None = None,
    ) -> "Estimator":
        """Factors for ``weights`` ({(layer, proj): weight}); loaded from / saved to ``cache_dir`` when given."""
        named = {f"{layer}.{proj}": w for (layer, proj), w in weights.items()}
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
        factors: dict[str, torch.Tensor] = {}
        path = None
        if cache_dir is not None:
            if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
                raise EstimatorCacheError(
                    f"estimator_dir {cache_dir} is a file, not a folder; pass a folder (--estimator-dir) where the "
                    "SVD factors can be cached"
                )
            fp = fingerprint(named)
            path = Path(cache_dir) / f"estimator-{fp[:24]}-r{rank}.safetensors"
        # another process building the same file (no torch.distributed): wait for it and load its result
        with file_lock(path) if path is not None else contextlib.nullcontext():
            if path is not None and path.exists():
                factors = cls._load(path, fp, rank, named)
            missing = [n for n in named if f"{n}.A" not in factors]
            for n in missing:
                a, b = low_rank_factors(named[n], rank)
                factors[f"{n}.A"], factors[f"{n}.B"] = a, b
            if path is not None and missing:
                meta = {"fingerprint": fp, "rank": str(rank), "version": ESTIMATOR_VERSION}
                cpu = {k: v.detach().cpu().contiguous() for k, v in factors.items()}
                atomic_write(path, lambda p: save_file(cpu, str(p), metadata=meta))
        return cls({k: v.to(device) for k, v in factors.items()}, rank)

    @staticmethod
    def _load(path: Path, fp: str, rank: int, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own SafetensorError for a truncated/damaged file
            raise EstimatorCacheError(
                f"estimator cache {path} cannot be read: it is truncated or damaged ({exc}). Delete the file; "
                "it is rebuilt from the weights on the next run"
            ) from None
        if meta.get("fingerprint") != fp or meta.get("rank") != str(rank):
            raise EstimatorCacheError(
                f"estimator cache {path} was built from other weights (or another rank) than this model's; "
                "delete the file or pass a different estimator_dir"
            )
        try:
            factors = load_file(str(path))
        except Exception as exc:
            raise EstimatorCacheError(
                f"estimator cache {path} cannot be read: it is truncated or damaged ({exc}). Delete the file; "
                "it is rebuilt from the weights on the next run"
            ) from None
        for n, w in named.items():
            a, b = factors.get(f"{n}.A"), factors.get(f"{n}.B")
            if a is not None and (a.shape != (w.shape[1], rank) or b.shape != (rank, w.shape[0])):
                raise EstimatorCacheError(f"estimator cache {path} has factors of the wrong shape for {n}; delete it")
        return factors
