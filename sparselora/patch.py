"""apply_sparselora / remove_sparselora and the switches on a patched model.

Only the given model instance changes: layer forwards are swapped per instance and hooks are registered on
its modules, so any other model in the process behaves exactly as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

import torch
from torch import nn

from sparselora import distributed
from sparselora.config import SparseLoRAConfig
from sparselora.estimator import Estimator
from sparselora.models.registry import ATTN_PROJS, PROJS, arch_info, causal_lm, decoder_layers, projection, sliced_projections
from sparselora.modules import SparseAttention, SparseMLP
from sparselora.modules.linear import FusedLoRALinear, FusedQKV
from sparselora.modules.stream import PermutedStream, runs, wants_hidden_states
from sparselora.ops.lora_layer import base_weight_bias
from sparselora.selection import SELECTORS
from sparselora.state import STATE_ATTR, SparseLoRAState

logger = logging.getLogger("sparselora")


def get_state(model: nn.Module, required: bool = True) -> SparseLoRAState | None:
    state = getattr(causal_lm(model), STATE_ATTR, None)
    if state is None and required:
        raise ValueError("this model has no SparseLoRA applied; call sparselora.apply_sparselora(model, config) first")
    return state


def _estimator_weights(hf, config: SparseLoRAConfig) -> dict[tuple[int, str], torch.Tensor]:
    layers = decoder_layers(hf)
    weights = {}
    for i, s in config.ffn_sparsity.items():
        if s > 0:
            for p in ("gate", "up"):
                weights[(i, p)] = base_weight_bias(projection(layers[i], p))[0]
    for i, s in config.attn_sparsity.items():
        if s > 0:
            for p in ("q", "k", "v"):
                weights[(i, p)] = base_weight_bias(projection(layers[i], p))[0]
    return weights


def apply_sparselora(
    model: nn.Module,
    config: SparseLoRAConfig,
    estimator_dir: str | Path | None = None,
    fast_kernels: bool = False,
) -> nn.Module:
    """Make ``model`` (a PeftModel or a plain transformers causal LM) run sparse on context tokens.

    Sparsity applies to forwards that receive ``labels``; with ``config.start_step > 0`` the model stays
    dense until `schedule` (or `SparseLoRACallback`) passes that step. ``fast_kernels`` adds fused RMSNorm and
    SiLU*up (liger-kernel on CUDA) and computes the LM head and loss on labelled positions only (forwards with
    labels then return ``logits=None``). Returns the same model.
    """
    if not isinstance(config, SparseLoRAConfig):
        raise TypeError(f"config must be a SparseLoRAConfig, got {type(config).__name__}")
    hf = causal_lm(model)
    if getattr(hf, STATE_ATTR, None) is not None:
        raise ValueError("SparseLoRA is already applied to this model; call remove_sparselora(model) before applying again")
    arch = arch_info(hf.config)
    config.check_layers(arch.num_layers)
    weights = _estimator_weights(hf, config)
    distributed.check_full_weights(distributed.sparse_projections(hf, config), "apply")  # sharded before apply: refuse
    for (i, p), w in weights.items():
        if config.estimator_rank > min(w.shape):
            raise ValueError(
                f"estimator_rank={config.estimator_rank} exceeds the smaller dim of layer {i}'s {p}_proj "
                f"{tuple(w.shape)}; use estimator_rank <= {min(w.shape)}"
            )
    estimator = None
    if SELECTORS[config.selector].needs_factors and weights:
        # under torch.distributed: rank 0 builds (or loads), the others receive its factors
        estimator = distributed.build_estimator(weights, config.estimator_rank, estimator_dir, Estimator.build)

    state = SparseLoRAState(config, arch, estimator)
    # transformers >= 5.25 loads models with hub kernels on ("kernelized") and kernelizes again at every
    # train()/eval(), which resets the very forwards SparseLoRA swaps (the fused norms, say): turn them off while
    # SparseLoRA is applied, before swapping anything; `remove_sparselora` turns them back on
    state.hub_kernels = bool(getattr(hf, "use_kernels", False))
    if state.hub_kernels:
        hf.use_kernels = False
        logger.info("sparselora: transformers' hub kernels are off on this model while SparseLoRA is applied")
    layers = decoder_layers(hf)
    sliced = sliced_projections(config)
    try:
        for i in range(arch.num_layers):
            wrappers = []
            if config.ffn_sparsity.get(i, 0) > 0:
                wrappers.append(SparseMLP(layers[i].mlp, i, config.ffn_sparsity[i], state))
            if config.attn_sparsity.get(i, 0) > 0:
                wrappers.append(SparseAttention(layers[i].self_attn, i, config.attn_sparsity[i], state))
            if wrappers:
                state.layers[i] = wrappers
            # SparseAttention runs its four projections itself; q/k/v of other blocks are a FusedQKV, every other
            # projection (the FFN's too: SparseMLP routes its dense rows through them) a FusedLoRALinear
            own = [p for p in PROJS if not (p in ATTN_PROJS and p in sliced.get(i, ()))]
            if {"q", "k", "v"} <= set(own):
                state.fused.append(FusedQKV({p: projection(layers[i], p) for p in ("q", "k", "v")}))
                own = [p for p in own if p not in ("q", "k", "v")]
            for p in own:
                state.fused.append(FusedLoRALinear(projection(layers[i], p)))
        if fast_kernels:
            from sparselora.modules import fast

            sparse_ffn = {i for i, s in config.ffn_sparsity.items() if s > 0}
            state.fused.extend(fast.install(hf, layers, sparse_ffn, state))
        _install_streams(layers, state)
    except Exception:
        for w in [w for ws in state.layers.values() for w in ws] + state.fused:
            w.remove()
        if state.hub_kernels:
            hf.use_kernels = True
        raise

    signature = inspect.signature(type(hf).forward)  # the class's: the instance's may be swapped (fast_kernels)

    def split_batch(module, args, kwargs):
        bound = signature.bind_partial(module, *args, **kwargs).arguments
        labels = bound.get("labels")
        shape = None
        if labels is not None:
            ref = bound.get("input_ids")
            if ref is None:
                ref = bound.get("inputs_embeds")
            shape = tuple(ref.shape[:2])
        state.begin_batch(labels, bound.get("attention_mask"), shape, wants_hidden_states(bound, hf.config))
        return None

    state.handles.append(hf.register_forward_pre_hook(split_batch, with_kwargs=True))
    distributed.install_guards(state)  # FSDP units finer than attention/MLP: refuse at the first sparse forward
    setattr(hf, STATE_ATTR, state)
    return model


def _install_streams(layers, state) -> None:
    """A `PermutedStream` over each run of consecutive attention-sparse layers; `state.permuted_at` tells the
    wrappers of those layers (and the last layer's head-rows FFN) that their input may arrive permuted."""
    attn = [i for i, ws in state.layers.items() if any(isinstance(w, SparseAttention) for w in ws)]
    for first, last in runs(attn):
        state.fused.append(PermutedStream(layers[first], layers[last], state))
        state.stream_layers.update(range(first, last + 1))


def remove_sparselora(model: nn.Module) -> nn.Module:
    """Restore every swapped forward and remove the hooks; the model is as before `apply_sparselora`."""
    state = get_state(model)
    for w in [w for ws in state.layers.values() for w in ws] + state.fused:
        w.remove()
    for h in state.handles:
        h.remove()
    if state.hub_kernels:
        causal_lm(model).use_kernels = True
    delattr(causal_lm(model), STATE_ATTR)
    return model


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the sparse path on or off (the schedule still applies when on)."""
    get_state(model).enabled = bool(enabled)


@contextlib.contextmanager
def dense(model: nn.Module):
    """``with sparselora.dense(model):`` runs the block densely, e.g. for evaluation losses."""
    state = get_state(model)
    before = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = before


def schedule(model: nn.Module, step: int, total_steps: int | None = None) -> bool:
    """Progressive sparsity for custom loops: dense before ``config.start_step``, sparse from it on.

    Call before each step with the number of completed optimizer steps; returns whether the step is sparse.
    """
    state = get_state(model)
    state.scheduled_on = step >= state.config.start_step_for(total_steps)
    return state.active


def kept_channels(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Channels kept by each sparse layer in its last sparse forward: {layer: {"ffn"|"q"|"k"|"v"|"o": idx}},
    each sorted (the sparse path itself keeps some unsorted: its ops take indices in any order)."""
    return {i: {kind: idx.sort().values for kind, idx in entry.items()} for i, entry in _kept(model).items()}


def _kept(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for i, wrappers in get_state(model).layers.items():
        entry: dict[str, torch.Tensor] = {}
        for w in wrappers:
            if isinstance(w, SparseMLP) and w.kept is not None:
                entry["ffn"] = w.kept
            elif isinstance(w, SparseAttention) and w.kept is not None:
                entry.update(w.kept)
        if entry:
            out[i] = entry
    return out


def sparsity_stats(model: nn.Module) -> dict[str, float]:
    """Numbers worth logging: whether the path is on, the context share of the last batch, kept fractions."""
    state = get_state(model)
    arch = state.arch
    stats = {"sparselora/active": float(state.active)}
    split = state.split
    if split is not None:
        stats["sparselora/context_fraction"] = split.num_context / (split.shape[0] * split.shape[1])
    ffn, attn = [], []
    for entry in _kept(model).values():  # counts only: no sort per logging step
        if "ffn" in entry:
            ffn.append(entry["ffn"].numel() / arch.intermediate_size)
        if "k" in entry:
            attn.append(entry["k"].numel() / (arch.num_kv_heads * arch.head_dim))
    if ffn:
        stats["sparselora/ffn_kept"] = sum(ffn) / len(ffn)
    if attn:
        stats["sparselora/attn_kept"] = sum(attn) / len(attn)
    return stats
