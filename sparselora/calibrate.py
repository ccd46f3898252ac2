"""Defaults that do not hurt: before training, the whole config's loss on a few real batches, and a back-off.

A preset's sparsity levels are a guess for a model and a data set; per-layer sensitivities add up badly (layers
interact). So `calibrate` measures what matters, the frozen model with the whole config against dense on the
run's own first batches, and scales every layer's sparsity down (uniformly, by ``factor`` per round) until the
change is within ``bound``. Two criteria: ``"loss"``, the relative rise of the mean loss over the labelled tokens,
and ``"kl"``, the mean KL(dense || sparse) of the next-token distributions there (nats). The mean loss can stay
flat while predictions change (tokens whose loss falls offset those whose loss rises; short answers drown in
template tokens that do not depend on the context); KL sees every change. It says what it measured and warns
when the bound cannot be met.

Then `allocate_sample_rows` spreads the sampled selector's rows over the FFN layers by what each needs: how much
of the oracle's mass a sample of each size keeps varies by layer (Qwen2.5-Coder-1.5B at 90% sparsity, batches of
32: 0.87 in its first sparse layer with 256 rows, 0.97 in the middle ones), so at the same total a few layers get
more rows and the rest fewer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from sparselora.config import SparseLoRAConfig
from sparselora.modules import SparseMLP
from sparselora.ops.fused_kernels import silu_mul
from sparselora.ops.topk import top_indices
from sparselora.patch import get_state
from sparselora.selection import ffn_keep_count, select_ffn
from sparselora.tokens import IGNORE_INDEX

# The default bound on the frozen loss's relative rise over dense: `sparselora finetune --loss-bound` (RunConfig)
# and `sparselora sensitivity --loss-bound` both read it from here.
DEFAULT_LOSS_BOUND = 0.05
DEFAULT_KL_BOUND = 0.1  # nats per labelled token (benchmarks/probe_criteria.py; docs/accuracy-notes.md)
CRITERIA = ("loss", "kl")


@dataclass
class Calibration:
    config: SparseLoRAConfig  # the config that runs (backed off, or the given one)
    dense_loss: float
    bound: float
    rounds: list[dict] = field(default_factory=list)  # {"scale", "sparse_loss", "increase"[, "kl"]} per config
    criterion: str = "loss"  # what ``bound`` bounds: "increase" (relative loss rise) or "kl" (nats)
    rows: RowAllocation | None = None  # the sampled rows spread over the FFN layers (None: not spread)
    rows_check: dict | None = None  # the criterion with the spread rows, as a round: {"sparse_loss", ...}
    rows_kept: bool = False  # whether the config runs with them (not when they broke the bound)

    @property
    def within_bound(self) -> bool:
        return bool(self.rounds) and self._value(self.rounds[-1]) <= self.bound

    def _value(self, r: dict) -> float:
        return r["kl"] if self.criterion == "kl" else r["increase"]

    def lines(self, batches: str = "the run's first batches", using: str = "training with") -> list[str]:
        """What was measured, one line per round, and the outcome (``using``: what is done with the config)."""
        kl = self.criterion == "kl"
        bound = f"KL(dense || sparse) <= {self.bound:g} nats/token" if kl else f"loss +{self.bound * 100:g}%"
        out = [f"sparsity probe (frozen model, {batches}): dense loss {self.dense_loss:.4f}, bound {bound}"]
        for r in self.rounds:
            out.append(f"  sparsity x{r['scale']:.2f}: sparse loss {r['sparse_loss']:.4f} ({r['increase']:+.1%})"
                       + (f", KL {r['kl']:.4f}" if kl else ""))
        last = self.rounds[-1]
        if self.within_bound:
            out.append(f"  -> {using} sparsity x{last['scale']:.2f} of the config")
        else:
            what = f"gives KL {last['kl']:.4f}" if kl else f"raises the loss {last['increase']:+.1%}"
            out.append(f"  -> WARNING: even x{last['scale']:.2f} {what}, above the bound; {using} it (lower the "
                       "sparsity, or raise the bound)")
        if self.rows is not None:
            out += ["  " + line for line in self.rows.lines()]
            c = self.rows_check
            measured = (f"sparse loss {c['sparse_loss']:.4f} ({c['increase']:+.1%})"
                        + (f", KL {c['kl']:.4f}" if kl else ""))
            out.append(f"    with them: {measured}" + ("" if self.rows_kept else
                       f"; worse against the bound, so every FFN layer keeps {self.rows.budget} rows"))
        return out


def _tidy(x: float) -> float:
    return float(f"{x:.12g}")


def scaled_config(cfg: SparseLoRAConfig, scale: float) -> SparseLoRAConfig:
    """``cfg`` with every layer's sparsity times ``scale``, to 12 significant digits (0.3087 in a written YAML, not
    0.3086999999999999; the rounded config is the one measured)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a scale of 0 is a dense config, which warns
        return dataclasses.replace(cfg, ffn_sparsity={i: _tidy(s * scale) for i, s in cfg.ffn_sparsity.items()},
                                   attn_sparsity={i: _tidy(s * scale) for i, s in cfg.attn_sparsity.items()})


def set_levels(model, cfg: SparseLoRAConfig) -> None:
    """Give the patched model's sparse layers the levels of ``cfg`` (same layers as the applied config)."""
    state = get_state(model)
    for i, wrappers in state.layers.items():
        for w in wrappers:
            w.sparsity = (cfg.ffn_sparsity if isinstance(w, SparseMLP) else cfg.attn_sparsity).get(i, 0.0)
    state.config = cfg


@contextlib.contextmanager
def _frozen(model):
    """Eval mode (no dropout) with the schedule switched on, the model's mode and switches restored after; yields
    the state, whose ``enabled`` picks the sparse (True) or dense (False) path of the next forwards. The running
    FFN scores start empty and are emptied after: a probe that re-reads its batches must not score a batch with
    its own history (optimistic), and training must not start from the probe's batches."""
    state = get_state(model)
    was_training, enabled, on = model.training, state.enabled, state.scheduled_on
    model.eval()
    state.scheduled_on = True
    state.reset_running_scores()
    try:
        yield state
    finally:
        state.enabled, state.scheduled_on = enabled, on
        state.reset_running_scores()
        model.train(was_training)


@torch.no_grad()
def frozen_loss(model, batches, sparse: bool) -> float:
    """Mean loss over ``batches`` with the sparse path on (from step 0) or off; eval mode (no dropout)."""
    with _frozen(model) as state:
        state.enabled = sparse
        losses = [float(model(**b).loss) for b in batches]
    return sum(losses) / len(losses)


def _labelled_logits(model, out, batch) -> torch.Tensor:
    """Next-token logits at the labelled positions (tokens, vocab), also when the fast head returned none."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    if out.logits is not None:
        return out.logits[:, :-1][mask]
    return model.get_output_embeddings()(out.hidden_states[-1][:, :-1][mask])


def _kl(dense: torch.Tensor, sparse: torch.Tensor, chunk: int = 512) -> float:
    """Summed KL(dense || sparse) over rows of logits, in row chunks (vocabularies are large)."""
    total = 0.0
    for i in range(0, dense.shape[0], chunk):
        d = torch.log_softmax(dense[i:i + chunk].float(), dim=-1)
        s = torch.log_softmax(sparse[i:i + chunk].float(), dim=-1)
        total += float((d.exp() * (d - s)).sum())
    return total


@torch.no_grad()
def _sparse_round(model, batches, chunk: int = 512) -> tuple[float, float]:
    """Mean sparse loss and mean KL(dense || sparse) over the labelled tokens (token-weighted), frozen."""
    losses, total, count = [], 0.0, 0
    with _frozen(model) as state:
        for b in batches:
            logits = []
            for sparse in (False, True):
                state.enabled = sparse
                out = model(**b, output_hidden_states=True)
                logits.append(_labelled_logits(model, out, b))
            losses.append(float(out.loss))  # the sparse forward's
            total += _kl(*logits, chunk=chunk)
            count += logits[0].shape[0]
    if not count:
        raise ValueError("the KL probe needs at least one labelled token in its batches")
    return sum(losses) / len(losses), total / count


def frozen_kl(model, batches, chunk: int = 512) -> float:
    """Mean KL(dense || sparse) of the next-token distributions over the labelled tokens of ``batches`` (nats,
    token-weighted), the frozen model as in `frozen_loss` (sparse from step 0, eval mode): `calibrate`'s ``"kl"``
    criterion (benchmarks/probe_criteria.py, docs/accuracy-notes.md: 0.077 on GSM8K vs 0.338 on the commonsense
    mix at x0.49 of the scaled preset, where the mean-loss increase is +4.0% vs +5.3%)."""
    return _sparse_round(model, batches, chunk)[1]


def calibrate(model, batches, bound: float | None = None, factor: float = 0.7, max_rounds: int = 6,
              criterion: str = "loss", spread: bool = True) -> Calibration:
    """Back the applied config off until ``criterion`` on ``batches`` is within ``bound`` (``"loss"``: relative
    rise of the frozen loss, default `DEFAULT_LOSS_BOUND`; ``"kl"``: mean KL in nats, default `DEFAULT_KL_BOUND`);
    leaves the model with the chosen levels and returns what was measured. With ``spread`` and the sampled
    selector (and no ``ffn_sample_rows`` given), the sampled rows are then spread over the FFN layers by need
    (`allocate_sample_rows`) and the criterion measured again; rows that break the bound are not kept."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if bound is None:
        bound = DEFAULT_KL_BOUND if criterion == "kl" else DEFAULT_LOSS_BOUND
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    if bound < 0 or not 0 < factor < 1 or max_rounds < 1:
        raise ValueError(f"need bound >= 0, 0 < factor < 1, max_rounds >= 1; got {bound}, {factor}, {max_rounds}")
    base = get_state(model).config
    cal = Calibration(base, frozen_loss(model, batches, sparse=False), bound, criterion=criterion)

    def measure() -> dict:
        if criterion == "kl":
            loss, kl = _sparse_round(model, batches)
        else:
            loss, kl = frozen_loss(model, batches, sparse=True), None
        return {"sparse_loss": loss, "increase": loss / cal.dense_loss - 1.0} | ({} if kl is None else {"kl": kl})

    scale = 1.0
    for _ in range(max_rounds):
        cfg = scaled_config(base, scale)
        set_levels(model, cfg)
        cal.rounds.append({"scale": scale} | measure())
        cal.config = cfg
        if cal.within_bound:
            break
        scale *= factor
    if not cal.within_bound:
        warnings.warn(cal.lines()[-1].strip(), stacklevel=2)
    if spread and cal.config.selector == "sampled" and not cal.config.ffn_sample_rows:
        cal.rows = allocate_sample_rows(model, batches, missing_ok=True)
        if cal.rows is not None:
            cal.rows_check = measure()
            # kept unless they break the bound (or, when even the last round was above it, make it worse)
            cal.rows_kept = cal._value(cal.rows_check) <= max(bound, cal._value(cal.rounds[-1]))
            if cal.rows_kept:
                cal.config = cal.rows.config
            else:
                get_state(model).config = cal.config
    return cal


# The sampled selector's per-layer row counts that `allocate_sample_rows` chooses from (powers of two: a step up
# doubles a layer's sample).
ROW_LADDER = (32, 64, 128, 256, 512, 1024)
# A layer whose sample keeps this much of the oracle's FFN mass gets no more rows (more would buy nothing).
ROWS_ENOUGH = 0.99


@dataclass
class RowAllocation:
    config: SparseLoRAConfig  # the config with ffn_sample_rows set
    mass: dict[int, dict[int, float]]  # FFN layer -> {rows: mass of that sample alone vs the oracle}, batch mean
    budget: int  # mean rows per FFN layer allowed (the config's sample_rows)

    def lines(self) -> list[str]:
        rows = self.config.ffn_sample_rows
        flat = min(self.mass, key=lambda i: self.mass[i][self.budget])
        worst = min(self.mass, key=lambda i: self.mass[i][rows[i]])
        groups = " ".join(f"{k}:{v}" for k, v in self.config.to_dict()["ffn_sample_rows"].items())
        return [f"sampled rows per FFN layer (mean {sum(rows.values()) / len(rows):.0f}, budget {self.budget}): "
                f"{groups}",
                f"  the sample keeps of the oracle's FFN mass, worst layer: {self.mass[flat][self.budget]:.3f} "
                f"(layer {flat}) with {self.budget} rows everywhere -> {self.mass[worst][rows[worst]]:.3f} "
                f"(layer {worst})"]


@torch.no_grad()
def ffn_sample_masses(xc: torch.Tensor, gate, up, n: int, levels, ladder) -> dict[float, dict[int, float]]:
    """{level: {S: mass}}: the share of the oracle's FFN activation mass over the context rows ``xc`` that the
    sampled selector's channels from S of them keep (mass = true channel scores summed over the chosen channels /
    over the oracle's), at each sparsity level."""
    true = torch.linalg.vector_norm(silu_mul(gate(xc), up(xc)).float(), dim=0)
    out = {}
    for s in levels:
        best = true[top_indices(true, ffn_keep_count(n, s))].sum()
        out[s] = {S: float(true[select_ffn("sampled", s, xc, gate, up, None, n, rows=S)].sum() / best)
                  for S in ladder}
    return out


@torch.no_grad()
def sample_mass(model, batches, ladder=ROW_LADDER) -> dict[int, dict[int, float]]:
    """Per sparse FFN layer of the applied config and per sample size S of ``ladder``: `ffn_sample_masses` at the
    layer's level, mean over ``batches``, frozen model, sparse path on (the inputs each layer sees in training)."""
    sums: dict[int, dict[int, float]] = {}
    seen: dict[int, int] = {}

    def probe(w, xc, n):
        if w.sparsity <= 0 or xc.shape[0] == 0:
            return
        masses = ffn_sample_masses(xc, w.mlp.gate_proj, w.mlp.up_proj, n, [w.sparsity], ladder)[w.sparsity]
        row = sums.setdefault(w.layer, dict.fromkeys(ladder, 0.0))
        for S, m in masses.items():
            row[S] += m
        seen[w.layer] = seen.get(w.layer, 0) + 1

    with _frozen(model) as state:
        state.enabled = True
        state.ffn_probe = probe
        try:
            for b in batches:
                model(**b)
        finally:
            state.ffn_probe = None
    return {i: {S: v / seen[i] for S, v in row.items()} for i, row in sorted(sums.items())}


def spread_rows(mass: dict[int, dict[int, float]], budget: int, ladder=ROW_LADDER,
                enough: float = ROWS_ENOUGH) -> dict[int, int]:
    """Rows per layer from the sizes of ``ladder``, at most ``budget`` a layer on average, that keep the most mass
    in the worst layer: every layer starts at the smallest size, then the layer that keeps the least steps up the
    ladder, while the total fits and that layer keeps less than ``enough`` (tests/test_sample_rows.py checks the
    worst layer against exhaustive search). So the cost is that of ``budget`` rows everywhere, or less."""
    sizes = sorted(ladder)
    total = budget * len(mass)
    rows = {i: sizes[0] for i in mass}

    def bigger(i):
        return sizes[sizes.index(rows[i]) + 1]

    while True:
        used = sum(rows.values())
        up = [i for i in rows if rows[i] != sizes[-1] and mass[i][rows[i]] < enough
              and used - rows[i] + bigger(i) <= total]
        if not up:
            return rows
        i = min(up, key=lambda j: (mass[j][rows[j]], j))
        rows[i] = bigger(i)


def allocate_sample_rows(model, batches, ladder=ROW_LADDER, missing_ok: bool = False) -> RowAllocation | None:
    """The sampled selector's rows spread over the applied config's sparse FFN layers by need, measured on
    ``batches`` (`sample_mass`, `spread_rows`): the config's ``sample_rows`` becomes the mean, not every layer's
    count. The model is left with the new config (its ``ffn_sample_rows``). ``missing_ok``: None, not an error,
    when no sparse FFN layer saw a context row."""
    state = get_state(model)
    cfg = state.config
    if cfg.selector != "sampled":
        raise ValueError(f"allocate_sample_rows spreads the sampled selector's rows; this config's selector is "
                         f"{cfg.selector!r}")
    if not batches:
        raise ValueError("allocate_sample_rows needs at least one batch")
    budget = cfg.sample_rows
    sizes = sorted({*ladder, budget})
    mass = sample_mass(model, batches, sizes)
    if not mass:
        if missing_ok:
            return None
        raise ValueError("allocate_sample_rows: no FFN layer of the config is sparse (or no batch has context "
                         "tokens): there are no rows to spread")
    rows = spread_rows(mass, budget, sizes)
    state.config = dataclasses.replace(cfg, ffn_sample_rows=rows)
    return RowAllocation(state.config, mass, budget)
