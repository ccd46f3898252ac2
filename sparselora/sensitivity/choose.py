"""Choosing a config for a FLOP budget from measured sensitivities: `choose_config` treats the loss increases as
additive over layers and picks, for every FFN and every attention block, a level (or dense) by a multiple-choice
knapsack: the least predicted loss increase whose analytic FLOPs (`sparselora.flops`) are at most ``budget`` x
dense. FLOP savings are additive over layers in that model, and the chosen config is checked with `flops` itself.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from sparselora.config import SparseLoRAConfig
from sparselora.errors import SparseLoRAError
from sparselora.flop_count import as_arch, flops
from sparselora.models.registry import ATTN_PROJS
from sparselora.selection import DEFAULT_SELECTOR
from sparselora.sensitivity.measure import KIND_NAMES, KINDS, Sensitivity, check_levels, one_layer_config


class InfeasibleBudgetError(SparseLoRAError, ValueError):
    """The FLOP budget is below what the highest sparsity level in every layer can reach."""



def predicted_deltas(sens: Sensitivity, kind: str) -> list[list[float]]:
    """Loss increases the optimizer uses: clipped at 0 and made non-decreasing in the level (a sparser block
    never predicts less harm than a denser one; lower measurements than that are noise)."""
    out = []
    for row in sens.delta(kind):
        best, cleaned = 0.0, []
        for v in row:
            best = max(best, v if math.isfinite(v) else math.inf)
            cleaned.append(best)
        out.append(cleaned)
    return out


@dataclass
class Choice:
    config: SparseLoRAConfig
    ratio: float  # sparse / dense FLOPs per `flops`
    predicted_delta: float
    min_ratio: float  # the ratio with every block at the highest level
    flops: dict[str, float]
    batch_shape: tuple[int, int]
    labelled_tokens: int


def _flops_kwargs(lora_rank: int, lora_targets: Sequence[str]) -> dict[str, Any]:
    return {"lora_rank": lora_rank, "lora_targets": tuple(lora_targets)}


def block_savings(
    model_config,
    levels: Sequence[float],
    batch_shape: tuple[int, int],
    labelled_tokens: int,
    estimator_rank: int = 8,
    rope_pairs: bool = True,
    lora_rank: int = 32,
    lora_targets: Sequence[str] = ATTN_PROJS,
    selector: str = DEFAULT_SELECTOR,
) -> tuple[float, dict[str, list[list[float]]]]:
    """Dense FLOPs, and FLOPs saved by each (kind, layer, level) alone, as `flops` counts them (the selector's own
    cost included)."""
    arch = as_arch(model_config)
    kw = _flops_kwargs(lora_rank, lora_targets)
    base = flops(arch, None, batch_shape, labelled_tokens, **kw)
    saved: dict[str, list[list[float]]] = {k: [] for k in KINDS}
    for kind in KINDS:
        for layer in range(arch.num_layers):
            row = []
            for level in levels:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cfg = one_layer_config(kind, layer, level, selector, estimator_rank, rope_pairs)
                row.append(base["sparse"] - flops(arch, cfg, batch_shape, labelled_tokens, **kw)["sparse"])
            saved[kind].append(row)
    return base["dense"], saved


def check_budget(
    model_config,
    budget: float,
    levels: Sequence[float],
    batch_shape: tuple[int, int],
    labelled_tokens: int,
    estimator_rank: int = 8,
    rope_pairs: bool = True,
    lora_rank: int = 32,
    lora_targets: Sequence[str] = ATTN_PROJS,
    kinds: Sequence[str] = KINDS,
    selector: str = DEFAULT_SELECTOR,
) -> float:
    """The lowest reachable FLOP ratio (every block at the highest level); raises `InfeasibleBudgetError`
    when ``budget`` is below it. Cheap: call it before measuring."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be in (0, 1]: the fraction of dense FLOPs a training step may cost")
    levels = check_levels(levels)
    arch = as_arch(model_config)
    top = {k: [len(levels) - 1 if k in kinds else -1] * arch.num_layers for k in KINDS}
    cfg = _build_config(top, levels, estimator_rank, selector, rope_pairs, 0.05)
    min_ratio = flops(arch, cfg, batch_shape, labelled_tokens, **_flops_kwargs(lora_rank, lora_targets))["ratio"]
    if budget < min_ratio - 1e-12:
        raise InfeasibleBudgetError(
            f"a FLOP budget of {budget:g} x dense is infeasible: even with every "
            f"{' and '.join(KIND_NAMES[k] for k in kinds)} block at the highest level ({levels[-1]:g}) a step "
            f"costs {min_ratio:.4f} x dense (labelled tokens, the LM head, the attention core and the estimator "
            f"stay dense); use a budget >= {math.ceil(min_ratio * 1000) / 1000:g} or a higher level"
        )
    return min_ratio


def _build_config(choice: dict[str, list[int]], levels, estimator_rank, selector, rope_pairs, start_step):
    ffn = {i: levels[j] for i, j in enumerate(choice["ffn"]) if j >= 0}
    attn = {i: levels[j] for i, j in enumerate(choice["attn"]) if j >= 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an all-dense choice is legitimate when the budget allows it
        return SparseLoRAConfig(
            ffn_sparsity=ffn,
            attn_sparsity=attn,
            estimator_rank=estimator_rank,
            selector=selector,
            start_step=start_step,
            rope_pairs=rope_pairs,
        )


def choose_config(
    sens: Sensitivity,
    model_config,
    budget: float,
    batch_shape: tuple[int, int],
    labelled_tokens: int,
    *,
    rope_pairs: bool = True,
    lora_rank: int = 32,
    lora_targets: Sequence[str] = ATTN_PROJS,
    start_step: float = 0.05,
    resolution: int = 4000,
    kinds: Sequence[str] = KINDS,
) -> Choice:
    """The per-block levels with the least predicted (additive) loss increase whose FLOP ratio is <= budget.

    A multiple-choice knapsack solved exactly by dynamic programming over FLOP savings discretised into
    ``resolution`` steps of the dense cost; savings are rounded down and the requirement up, so the result
    always meets the budget (then checked with `flops`). Among equally good choices the one saving least
    (closest to the budget, i.e. least sparse) wins. Raises `InfeasibleBudgetError` when even the highest
    level everywhere does not reach the budget.
    """
    levels = sens.levels
    arch = as_arch(model_config)
    kw = _flops_kwargs(lora_rank, lora_targets)
    n = arch.num_layers
    allowed = [k for k in KINDS if k in kinds]
    min_ratio = check_budget(
        arch, budget, levels, batch_shape, labelled_tokens, sens.estimator_rank, rope_pairs, lora_rank,
        lora_targets, allowed, sens.selector,
    )
    dense, saved = block_savings(
        arch, levels, batch_shape, labelled_tokens, sens.estimator_rank, rope_pairs, lora_rank, lora_targets,
        sens.selector,
    )
    import numpy as np

    unit = dense / resolution
    deltas = {k: predicted_deltas(sens, k) for k in KINDS}
    groups = []  # (kind, layer, [(save_units, delta, level index)])
    for kind in allowed:
        for layer in range(n):
            opts = [(0, 0.0, -1)]
            for j in range(len(levels)):
                d = deltas[kind][layer][j]
                if math.isfinite(d):
                    opts.append((max(0, round(saved[kind][layer][j] / unit)), d, j))
            groups.append((kind, layer, opts))
    size = sum(max(u for u, _, _ in opts) for _, _, opts in groups) + 1
    # best[t]: least predicted loss of the groups so far with savings of t units; picks: the option taken
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for _, _, opts in groups:
        new = np.full(size, np.inf)
        pick = np.full(size, -1, dtype=np.int64)
        for oi, (u, d, _) in enumerate(opts):
            cand = np.full(size, np.inf)
            cand[u:] = best[: size - u] + d
            better = cand < new - 1e-15  # ties keep the earlier option: dense, then lower levels
            new[better] = cand[better]
            pick[better] = oi
        best = new
        picks.append(pick)

    def reconstruct(t: int) -> dict[str, list[int]]:
        choice = {k: [-1] * n for k in KINDS}
        for (kind, layer, opts), pick in zip(reversed(groups), reversed(picks)):
            oi = int(pick[t])
            choice[kind][layer] = opts[oi][2]
            t -= opts[oi][0]
        return choice

    # candidates by predicted loss, then by least saving (closest to the budget); savings were rounded to
    # units, so each candidate is checked with the exact FLOP count
    need_units = dense * (1.0 - budget) / unit
    finite = np.flatnonzero(np.isfinite(best))
    cells = sorted((float(best[t]), int(t)) for t in finite if t >= need_units - 2 * len(groups))
    for _, t in cells:
        choice = reconstruct(t)
        cfg = _build_config(choice, levels, sens.estimator_rank, sens.selector, rope_pairs, start_step)
        f = flops(arch, cfg, batch_shape, labelled_tokens, **kw)
        if f["ratio"] <= budget + 1e-12:
            pred = sum(deltas[k][i][j] for k in KINDS for i, j in enumerate(choice[k]) if j >= 0)
            return Choice(cfg, f["ratio"], pred, min_ratio, f, tuple(batch_shape), int(labelled_tokens))
    raise InfeasibleBudgetError(  # unreachable after check_budget: the all-highest choice is a candidate
        f"no configuration meets a FLOP budget of {budget:g} x dense; try a slightly larger budget"
    )

