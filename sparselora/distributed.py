"""SparseLoRA under torch.distributed (DDP, FSDP) and with several processes sharing one estimator cache.

Every rank selects channels from its own micro-batch; nothing about the sparse path talks to other ranks, and
LoRA gradients are reduced by DDP/FSDP as usual. Two things need care:

* The SVD estimator. When torch.distributed is initialised, rank 0 alone builds it (or loads it from
  ``estimator_dir``) and broadcasts the factors to the other ranks, so no two processes ever build it at the
  same time, every rank holds bit-identical factors (those of rank 0's weights, which is also what DDP
  broadcasts at wrap time), and ``estimator_dir`` needs no shared filesystem. With ``estimator_dir=None`` it
  stays in memory, as in a single process. An error on rank 0 is sent to every rank instead of leaving them
  waiting. Independent processes without torch.distributed (say two jobs on one machine) serialise on a file
  lock next to the cache file: the first builds and writes it, the others wait and load it.

* Sharded weights. The sparse ops slice the frozen ``base_layer.weight`` (and LoRA A/B) directly, without
  calling those modules. Under FSDP the weights are full only inside the forward of the FSDP unit that owns
  them, so the unit must be the decoder layer, its attention/MLP, or anything coarser (the usual wrapping).
  `check_full_weights` refuses sharded or flattened weights at `apply_sparselora` time (the model was sharded
  first: the estimator would be built from shards) and a forward pre-hook refuses them at the first sparse
  forward (an FSDP unit around single projections or LoRA modules), with an error that says what to change.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from sparselora.errors import SparseLoRAError
from sparselora.models.registry import (
    BLOCK,
    FFN_PROJS,
    decoder_layers,
    module_name,
    projection,
    sliced_projections,
)


class ShardedWeightError(SparseLoRAError, RuntimeError):
    """A projection SparseLoRA slices is sharded or flattened where the sparse path reads it."""


# -- torch.distributed facts --------------------------------------------------------------------------------
def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def _collective_device() -> torch.device | None:
    """Where object collectives stage their bytes: the local GPU under NCCL, the CPU otherwise."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


# -- estimator: built on rank 0, broadcast -------------------------------------------------------------------
def build_estimator(weights, rank_: int, estimator_dir, build):
    """``build(weights, rank_, estimator_dir)`` on rank 0 only, its factors broadcast to every rank.

    Without torch.distributed it is just ``build(...)``. The returned estimator's factors lie on the device
    of this rank's weights.
    """
    if not is_distributed() or world_size() == 1:
        return build(weights, rank_, estimator_dir)
    from sparselora.estimator import Estimator, fingerprint

    named = {f"{layer}.{proj}": w for (layer, proj), w in weights.items()}
    device = next(iter(weights.values())).device
    payload: dict = {}
    if rank() == 0:
        try:
            est = build(weights, rank_, estimator_dir)
            payload = {
                "factors": {k: v.detach().cpu() for k, v in est.factors.items()},
                "fingerprint": fingerprint(named),
            }
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, then raised here too
            payload = {"error": f"{type(e).__name__}: {e}"}
            _broadcast(payload)
            raise
    payload = _broadcast(payload)
    if "error" in payload:
        raise RuntimeError(f"sparselora: rank 0 failed to build the SVD estimator: {payload['error']}")
    if rank() != 0 and fingerprint(named) != payload["fingerprint"]:
        warnings.warn(
            f"sparselora: rank {rank()}'s frozen weights differ from rank 0's; the estimator is rank 0's. That is "
            "right if DDP/FSDP will broadcast rank 0's weights (DDP does at wrap time), wrong if the ranks are "
            "meant to hold different models.",
            stacklevel=3,
        )
    return Estimator({k: v.to(device) for k, v in payload["factors"].items()}, rank_)


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


# -- sharded weights ---------------------------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    # no import: if torch.distributed.tensor was never imported, nothing can be a DTensor
    for mod in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(mod), "DTensor", None)
        if cls is not None and isinstance(t, cls):
            return True
    return False


def _linear_problem(linear: nn.Module) -> str | None:
    w = getattr(linear, "weight", None)
    if w is None:
        return "has no weight"
    if _is_dtensor(w):
        return f"weight is a sharded DTensor ({w.placements})"
    expected = (linear.out_features, linear.in_features)
    if tuple(w.shape) != expected:
        return f"weight has shape {tuple(w.shape)} instead of {expected} (a flattened FSDP shard)"
    return None


def _projection_linears(proj: nn.Module):
    """(name, nn.Linear) for the base layer and every LoRA A/B Linear of one projection."""
    yield "base_layer", getattr(proj, "base_layer", proj)
    for kind in ("lora_A", "lora_B"):
        for name, m in getattr(proj, kind, {}).items():
            if isinstance(m, nn.Linear):
                yield f"{kind}.{name}", m


def sparse_projections(hf_model: nn.Module, config) -> dict[str, nn.Module]:
    """{qualified name: projection} of every projection the sparse path of ``config`` slices."""
    layers = decoder_layers(hf_model)
    return {_qualified(i, p): projection(layers[i], p) for i, ps in sliced_projections(config).items() for p in ps}


def _qualified(layer: int, p: str) -> str:
    return f"layers.{layer}.{BLOCK[p]}.{module_name(p)}"


def check_full_weights(modules: dict[str, nn.Module], when: str) -> None:
    """Raise ShardedWeightError if any projection in ``modules`` ({qualified name: projection}) is sharded."""
    for pname, proj in modules.items():
        for sub, linear in _projection_linears(proj):
            problem = _linear_problem(linear)
            if problem is None:
                continue
            if when == "apply":
                raise ShardedWeightError(
                    f"sparselora: {pname}.{sub} {problem}. The model was sharded (FSDP) before apply_sparselora; "
                    "call apply_sparselora on the full model first, then wrap it with fully_shard / FSDP "
                    "(the estimator is built from the full frozen weights)."
                )
            raise ShardedWeightError(
                f"sparselora: {pname}.{sub} {problem} inside its attention/MLP forward. SparseLoRA slices the "
                "frozen and LoRA weights directly, so they must be unsharded there: make the FSDP unit the "
                "decoder layer (or its self_attn / mlp, or coarser), not single projections or LoRA modules "
                "(e.g. fully_shard(layer) for each model.model.layers[i], or FSDP1 transformer_layer_cls_to_wrap "
                "= the decoder layer class, without PEFT's per-LoRA-module wrap policy)."
            )


def _sharding_possible() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def install_guards(state) -> None:
    """A forward pre-hook on each sparse attention/MLP module refusing sharded weights at its first use.

    Registered with ``prepend=True`` so it runs before the selection hook; FSDP's own unshard hook on the same
    module (if it is an FSDP unit) is prepended later and so still runs first.
    """
    from sparselora.modules import SparseAttention, SparseMLP

    for i, wrappers in state.layers.items():
        for w in wrappers:
            if isinstance(w, SparseMLP):
                module = w.mlp
                projs = {_qualified(i, p): getattr(module, module_name(p)) for p in FFN_PROJS}
            elif isinstance(w, SparseAttention):
                module = w.attn
                projs = {_qualified(i, p): m for p, m in w.projs.items()}
            else:
                continue

            def guard(mod, args, kwargs, projs=projs):
                # the sparse path will read the weights; only a process group can have sharded them (FSDP, DTensor),
                # and one process skips the per-call check (~50 us of host time a sparse module, every step)
                if state.active and state.split is not None and _sharding_possible():
                    check_full_weights(projs, "forward")
                return None

            state.handles.append(module.register_forward_pre_hook(guard, with_kwargs=True, prepend=True))
