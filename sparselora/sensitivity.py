"""Layer-wise sensitivity analysis: which layers can run sparse, and how much, for a FLOP budget.

For a frozen model (optionally with a LoRA adapter) and a small calibration slice of the fine-tuning data,
`measure_sensitivity` records the loss increase on the labelled tokens when *one* layer's FFN, or *one*
layer's attention, alone runs the SparseLoRA sparse path at each sparsity level, everything else dense.
It uses the library's own sparse path (`apply_sparselora` with a one-layer config, start_step 0), so what
is measured is exactly what training would compute.

`choose_config` then treats the loss increases as additive over layers and picks, for every FFN and every
attention block, a level (or dense) by a multiple-choice knapsack: the least predicted loss increase whose
analytic FLOPs (`sparselora.flops`) are at most ``budget`` x dense. FLOP savings are additive over
layers in that model, and the chosen config is checked with `flops` itself.

Cost: one dense pass over the slice, then ``layers x 2 x levels`` sparse passes. Layers before the measured
one are not recomputed: their dense output (cached from the dense pass) is returned by a stub, so a pass
for layer ``L`` only runs layers ``L..end`` (about half the model on average).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparselora.config import SparseLoRAConfig
from sparselora.errors import SparseLoRAError
from sparselora.flop_count import as_arch, flops
from sparselora.models.registry import ATTN_PROJS, arch_info, causal_lm, decoder_layers
from sparselora.patch import apply_sparselora, get_state, remove_sparselora
from sparselora.tokens import IGNORE_INDEX

KINDS = ("ffn", "attn")
KIND_NAMES = {"ffn": "FFN", "attn": "attention"}


class InfeasibleBudgetError(SparseLoRAError, ValueError):
    """The FLOP budget is below what the highest sparsity level in every layer can reach."""


# ----------------------------------------------------------------------------------------------- data


def make_batches(features: Sequence[dict], collator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Pad tokenized examples into batches, longest first within length-sorted groups (little padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    return [collator([features[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


def batch_stats(batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average real length and labelled-token count per sequence (what `flops` needs), and totals."""
    n_seq = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    labelled = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    if n_seq == 0:
        raise ValueError("no calibration sequences")
    return {
        "sequences": n_seq,
        "avg_length": tokens / n_seq,
        "avg_labelled": labelled / n_seq,
        "context_fraction": 1.0 - labelled / max(tokens, 1),
    }


# ----------------------------------------------------------------------------------------------- loss


def _loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over labelled positions, and their count (float32 softmax)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    keep = shift_labels != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="sum")
    return float(loss), n


class _Runner:
    """Forwards over fixed calibration batches; caches each decoder layer's dense output per batch so that a
    pass perturbing layer ``L`` can skip layers ``0..L-1``."""

    def __init__(self, model, batches: Sequence[dict[str, torch.Tensor]], device, labelled_head: bool = True):
        self.model = model
        self.hf = causal_lm(model)
        self.layers = decoder_layers(self.hf)
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self.cache: list[list[Any]] = []  # [batch][layer] -> that layer's dense output
        self.forwards = 0
        self.layer_calls = 0
        # The LM head (and the loss) only on positions that predict a labelled token: with a large vocabulary
        # the head is a big share of a pass. Needs transformers' `logits_to_keep` and settable loss_function.
        self.labelled_head = (
            labelled_head
            and "logits_to_keep" in inspect.signature(self.hf.forward).parameters
            and isinstance(getattr(type(self.hf), "loss_function", None), property)
            and type(self.hf).loss_function.fset is not None
        )
        self.positions = []  # per batch: positions p whose next token (p + 1) is labelled in some row
        for b in self.batches:
            nxt = (b["labels"][:, 1:] != IGNORE_INDEX).any(0)
            self.positions.append(torch.nonzero(nxt).flatten())

    @contextlib.contextmanager
    def _no_internal_loss(self):
        had = "_loss_function" in self.hf.__dict__
        saved = self.hf.__dict__.get("_loss_function")
        self.hf.loss_function = lambda logits, labels, **kw: logits.new_zeros(())
        try:
            yield
        finally:
            if had:
                self.hf._loss_function = saved
            else:
                del self.hf._loss_function

    def _forward_at(self, j: int) -> tuple[float, int]:
        batch = self.batches[j]
        self.forwards += 1
        if not self.labelled_head:
            out = self.model(**batch, use_cache=False)
            return _loss_sums(out.logits, batch["labels"])
        pos = self.positions[j]
        with self._no_internal_loss():
            out = self.model(**batch, use_cache=False, logits_to_keep=pos)
        logits = out.logits.float()  # (B, K, V)
        target = batch["labels"][:, pos + 1].to(logits.device)
        keep = target != IGNORE_INDEX
        n = int(keep.sum())
        if n == 0:
            return 0.0, 0
        return float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")), n

    @torch.no_grad()
    def dense(self) -> float:
        """Mean loss of the unmodified model, filling the per-layer output cache."""
        total, count = 0.0, 0
        self.cache = []
        for j, b in enumerate(self.batches):
            outs: list[Any] = [None] * len(self.layers)
            handles = [
                layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
                for i, layer in enumerate(self.layers)
            ]
            try:
                s, n = self._forward_at(j)
            finally:
                for h in handles:
                    h.remove()
            self.layer_calls += len(self.layers)
            self.cache.append(outs)
            total, count = total + s, count + n
        if count == 0:
            raise ValueError("the calibration batches have no labelled token (every label is -100)")
        return total / count

    @contextlib.contextmanager
    def _skip_before(self, first: int, batch_index: int):
        """Layers < ``first`` return their cached dense output instead of computing (forward swapped on the
        instances, restored afterwards)."""
        if first == 0:
            yield
            return
        cached = self.cache[batch_index][first - 1]
        saved = []
        for layer in self.layers[:first]:
            saved.append(layer.__dict__.get("forward"))
            layer.forward = lambda *a, **k: cached
        try:
            yield
        finally:
            for layer, f in zip(self.layers[:first], saved):
                if f is None:
                    del layer.forward
                else:
                    layer.forward = f

    @torch.no_grad()
    def loss_from(self, first: int) -> float:
        """Mean loss with layers before ``first`` taken from the dense cache (whatever sparsity is applied to
        layers >= ``first`` runs for real)."""
        total, count = 0.0, 0
        for j, b in enumerate(self.batches):
            with self._skip_before(first, j):
                s, n = self._forward_at(j)
            self.layer_calls += len(self.layers) - first
            total, count = total + s, count + n
        return total / count


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Sensitivity:
    """Raw measurements: loss with one layer's FFN or attention sparse at each level."""

    levels: list[float]
    num_layers: int
    dense_loss: float
    loss: dict[str, list[list[float]]]  # kind -> [layer][level index] -> mean loss on the slice
    selector: str = "svd"
    estimator_rank: int = 8
    seconds: float = 0.0
    forwards: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def delta(self, kind: str) -> list[list[float]]:
        """Loss increase over dense, [layer][level index]."""
        return [[v - self.dense_loss for v in row] for row in self.loss[kind]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": self.levels,
            "num_layers": self.num_layers,
            "dense_loss": self.dense_loss,
            "selector": self.selector,
            "estimator_rank": self.estimator_rank,
            "loss": self.loss,
            "delta": {k: self.delta(k) for k in KINDS},
            "seconds": self.seconds,
            "forwards": self.forwards,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sensitivity":
        return cls(
            levels=[float(v) for v in d["levels"]],
            num_layers=int(d["num_layers"]),
            dense_loss=float(d["dense_loss"]),
            loss={k: [[math.nan if v is None else float(v) for v in row] for row in d["loss"][k]] for k in KINDS},
            selector=d.get("selector", "svd"),
            estimator_rank=int(d.get("estimator_rank", 8)),
            seconds=float(d.get("seconds", 0.0)),
            forwards=int(d.get("forwards", 0)),
            meta=dict(d.get("meta", {})),
        )


def check_levels(levels: Sequence[float]) -> list[float]:
    out = sorted({float(v) for v in levels})
    if not out:
        raise ValueError("give at least one sparsity level, e.g. 0.5,0.75,0.9,0.99")
    bad = [v for v in out if not 0.0 < v < 1.0]
    if bad:
        raise ValueError(
            f"sparsity levels {bad} are outside (0, 1): a level is the fraction of channels removed for context "
            "tokens (0.9 keeps 10%)"
        )
    return out


def _one_layer_config(kind: str, layer: int, level: float, selector: str, rank: int, rope_pairs: bool):
    key = "ffn_sparsity" if kind == "ffn" else "attn_sparsity"
    return SparseLoRAConfig(
        **{key: {layer: level}}, estimator_rank=rank, selector=selector, start_step=0, rope_pairs=rope_pairs
    )


def measure_sensitivity(
    model,
    batches: Sequence[dict[str, torch.Tensor]],
    levels: Sequence[float],
    selector: str = "svd",
    estimator_rank: int = 8,
    rope_pairs: bool = True,
    estimator_dir: str | Path | None = None,
    layers: Sequence[int] | None = None,
    progress: Callable[[str, int, int, float, list[float]], None] | None = None,
    seed: int = 0,
) -> Sensitivity:
    """Loss on ``batches`` (dicts with input_ids, attention_mask, labels) with each layer's FFN, then its
    attention, alone sparse at each level. The model is used frozen, in eval mode and without gradients,
    and is left as it was. ``progress(kind, layer, num_layers, seconds, losses)`` is called per block."""
    levels = check_levels(levels)
    hf = causal_lm(model)
    arch = arch_info(hf.config)
    if get_state(model, required=False) is not None:
        raise ValueError("measure sensitivity on a model without SparseLoRA applied (call remove_sparselora first)")
    layer_ids = list(range(arch.num_layers)) if layers is None else sorted(set(layers))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    loss: dict[str, list[list[float]]] = {k: [[math.nan] * len(levels) for _ in range(arch.num_layers)] for k in KINDS}
    tmp = None
    if estimator_dir is None:  # the factors of a layer are reused across its levels
        tmp = tempfile.TemporaryDirectory(prefix="sparselora-sensitivity-")
        estimator_dir = tmp.name
    try:
        runner = _Runner(model, batches, device)
        dense_loss = runner.dense()
        for layer in layer_ids:
            for kind in KINDS:
                t0 = time.perf_counter()
                for j, level in enumerate(levels):
                    cfg = _one_layer_config(kind, layer, level, selector, estimator_rank, rope_pairs)
                    torch.manual_seed(seed)  # the random selector draws the same way for every run
                    apply_sparselora(model, cfg, estimator_dir=estimator_dir)
                    try:
                        loss[kind][layer][j] = runner.loss_from(layer)
                    finally:
                        remove_sparselora(model)
                if progress is not None:
                    progress(kind, layer, arch.num_layers, time.perf_counter() - t0, loss[kind][layer])
    finally:
        if tmp is not None:
            tmp.cleanup()
        model.train(was_training)
    return Sensitivity(
        levels=levels,
        num_layers=arch.num_layers,
        dense_loss=dense_loss,
        loss=loss,
        selector=selector,
        estimator_rank=estimator_rank,
        seconds=time.perf_counter() - start,
        forwards=runner.forwards,
        meta={"layer_calls": runner.layer_calls, "full_model_equivalents": runner.layer_calls / arch.num_layers},
    )


@torch.no_grad()
def config_loss(model, batches, config: SparseLoRAConfig, estimator_dir: str | Path | None = None) -> float:
    """Mean loss on ``batches`` with ``config`` applied to every layer at once (forced on from step 0)."""
    d = config.to_dict()
    d["start_step"] = 0
    cfg = SparseLoRAConfig.from_dict(d)
    was_training = model.training
    model.eval()
    apply_sparselora(model, cfg, estimator_dir=estimator_dir)
    try:
        return _Runner(model, batches, next(model.parameters()).device).loss_from(0)
    finally:
        remove_sparselora(model)
        model.train(was_training)


# --------------------------------------------------------------------------------------------- choosing


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
) -> tuple[float, dict[str, list[list[float]]]]:
    """Dense FLOPs, and FLOPs saved by each (kind, layer, level) alone, as `flops` counts them."""
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
                    cfg = _one_layer_config(kind, layer, level, "svd", estimator_rank, rope_pairs)
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
) -> float:
    """The lowest reachable FLOP ratio (every block at the highest level); raises `InfeasibleBudgetError`
    when ``budget`` is below it. Cheap: call it before measuring."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be in (0, 1]: the fraction of dense FLOPs a training step may cost")
    levels = check_levels(levels)
    arch = as_arch(model_config)
    top = {k: [len(levels) - 1 if k in kinds else -1] * arch.num_layers for k in KINDS}
    cfg = _build_config(top, levels, estimator_rank, "svd", rope_pairs, 0.05)
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
        lora_targets, allowed,
    )
    dense, saved = block_savings(
        arch, levels, batch_shape, labelled_tokens, sens.estimator_rank, rope_pairs, lora_rank, lora_targets
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


# --------------------------------------------------------------------------------------------- reporting


def table_rows(sens: Sensitivity, cfg: SparseLoRAConfig | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer table: loss increase per level for FFN and attention, and the choice."""
    lv = [f"{v:g}" for v in sens.levels]
    header = ["layer"] + [f"FFN {v}" for v in lv] + [f"attn {v}" for v in lv]
    if cfg is not None:
        header += ["FFN chosen", "attn chosen"]
    d = {k: sens.delta(k) for k in KINDS}
    rows = []
    for i in range(sens.num_layers):
        row = [str(i)] + [f"{v:+.4f}" for v in d["ffn"][i]] + [f"{v:+.4f}" for v in d["attn"][i]]
        if cfg is not None:
            row += [f"{cfg.ffn_sparsity[i]:g}" if i in cfg.ffn_sparsity else "-",
                    f"{cfg.attn_sparsity[i]:g}" if i in cfg.attn_sparsity else "-"]
        rows.append(row)
    return header, rows


def format_table(sens: Sensitivity, cfg: SparseLoRAConfig | None = None) -> str:
    """Plain-text (markdown) table."""
    header, rows = table_rows(sens, cfg)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(sens: Sensitivity, cfg: SparseLoRAConfig | None = None, title: str | None = None) -> None:
    """The table with rich when it is installed, else plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        if title:
            print(title)
        print(format_table(sens, cfg))
        return
    header, rows = table_rows(sens, cfg)
    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="right")
    worst = max([abs(float(x)) for r in rows for x in r[1 : 1 + 2 * len(sens.levels)]] + [1e-12])
    for r in rows:
        cells = [r[0]]
        for x in r[1 : 1 + 2 * len(sens.levels)]:
            v = float(x)
            style = "red" if v > 0.5 * worst else "yellow" if v > 0.1 * worst else "green"
            cells.append(f"[{style}]{x}[/{style}]")
        cells += [f"[bold]{x}[/bold]" for x in r[1 + 2 * len(sens.levels) :]]
        t.add_row(*cells)
    console = Console()
    width = sum(max(len(h), 7) + 3 for h in header) + 1  # never squeeze numbers into ellipses
    if console.width < width:
        console = Console(width=width)
    console.print(t)


def fit_title(title: str, width_inches: float, fontsize: float = 9) -> str:
    """``title`` wrapped onto lines that fit a figure ``width_inches`` wide (a long one-line suptitle is clipped
    at both edges). An average character is taken as 0.6 of the font size wide, with a margin."""
    import textwrap

    per_line = max(20, int(width_inches * 72 / (0.6 * fontsize) * 0.9))
    return "\n".join(textwrap.wrap(title, per_line)) or title


def write_heatmap(sens: Sensitivity, path: str | Path, cfg: SparseLoRAConfig | None = None, title: str = "") -> bool:
    """PNG heatmap (layers x levels, FFN and attention panels, chosen levels boxed); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import SymLogNorm
    except ImportError:
        return False
    from sparselora.io import atomic_write

    import numpy as np

    n, L = sens.num_layers, len(sens.levels)
    data = {k: np.array(sens.delta(k), dtype=float) for k in KINDS}
    vmax = max(float(np.nanmax(np.abs(d))) for d in data.values()) or 1e-6
    norm = SymLogNorm(linthresh=max(vmax * 1e-3, 1e-6), vmin=-vmax, vmax=vmax)
    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.1 * L * 2, 1.5 + 0.28 * n), sharey=True, constrained_layout=True)
    im = None
    for ax, kind in zip(axes, KINDS):
        im = ax.imshow(data[kind], aspect="auto", cmap="RdBu_r", norm=norm, origin="upper")
        ax.set_xticks(range(L), [f"{v:g}" for v in sens.levels])
        ax.set_xlabel("sparsity level")
        ax.set_title(f"{KIND_NAMES[kind]}: loss increase")
        if cfg is not None:
            chosen = cfg.ffn_sparsity if kind == "ffn" else cfg.attn_sparsity
            for i, s in chosen.items():
                if s in sens.levels:
                    j = sens.levels.index(s)
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        if n <= 48:
            for i in range(n):
                for j in range(L):
                    ax.text(j, i, f"{data[kind][i, j]:.3f}", ha="center", va="center", fontsize=6)
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(n))
    fig.colorbar(im, ax=axes, label="loss - dense loss (symlog)", shrink=0.8)
    if title:
        fig.suptitle(fit_title(title, fig.get_size_inches()[0], fontsize=9), fontsize=9)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return True


def yaml_header(lines: Sequence[str]) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in lines)
