"""Defaults that do not hurt: before training, the whole config's loss on a few real batches, and a back-off.

A preset's sparsity levels are a guess for a model and a data set; per-layer sensitivities add up badly (layers
interact). So `calibrate` measures what matters, the frozen model's loss with the whole config against dense on
the run's own first batches, and scales every layer's sparsity down (uniformly, by ``factor`` per round) until the
relative increase is within ``bound``. It says what it measured and warns when the bound cannot be met.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch

from sparselora.config import SparseLoRAConfig
from sparselora.modules import SparseMLP
from sparselora.patch import get_state

# The default bound on the frozen loss's relative rise over dense: `sparselora finetune --loss-bound` (RunConfig)
# and `sparselora sensitivity --loss-bound` both read it from here.
DEFAULT_LOSS_BOUND = 0.05


@dataclass
class Calibration:
    config: SparseLoRAConfig  # the config that runs (backed off, or the given one)
    dense_loss: float
    bound: float
    rounds: list[dict] = field(default_factory=list)  # {"scale", "sparse_loss", "increase"} per config tried

    @property
    def within_bound(self) -> bool:
        return bool(self.rounds) and self.rounds[-1]["increase"] <= self.bound

    def lines(self, batches: str = "the run's first batches", using: str = "training with") -> list[str]:
        """What was measured, one line per round, and the outcome (``using``: what is done with the config)."""
        out = [f"sparsity probe (frozen model, {batches}): dense loss {self.dense_loss:.4f}, "
               f"bound +{self.bound * 100:g}%"]
        for r in self.rounds:
            out.append(f"  sparsity x{r['scale']:.2f}: sparse loss {r['sparse_loss']:.4f} "
                       f"({r['increase']:+.1%})")
        last = self.rounds[-1]
        if self.within_bound:
            out.append(f"  -> {using} sparsity x{last['scale']:.2f} of the config")
        else:
            out.append(f"  -> WARNING: even x{last['scale']:.2f} raises the loss {last['increase']:+.1%}, above the "
                       f"bound; {using} it (lower the sparsity, or raise the bound)")
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
    the state, whose ``enabled`` picks the sparse (True) or dense (False) path of the next forwards."""
    state = get_state(model)
    was_training, enabled, on = model.training, state.enabled, state.scheduled_on
    model.eval()
    state.scheduled_on = True
    try:
        yield state
    finally:
        state.enabled, state.scheduled_on = enabled, on
        model.train(was_training)


@torch.no_grad()
def frozen_loss(model, batches, sparse: bool) -> float:
    """Mean loss over ``batches`` with the sparse path on (from step 0) or off; eval mode (no dropout)."""
    with _frozen(model) as state:
        state.enabled = sparse
        losses = [float(model(**b).loss) for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def frozen_kl(model, batches, chunk: int = 512) -> float:
    """Mean KL(dense || sparse) of the next-token distributions over the labelled tokens of ``batches`` (nats,
    token-weighted), the frozen model as in `frozen_loss` (sparse from step 0, eval mode).

    Not used by `calibrate` (which bounds the relative mean-loss increase). A candidate probe criterion: unlike the
    mean loss it cannot be offset by tokens whose loss falls, and it sees every change of a prediction, so it is
    not diluted by template tokens that do not depend on the context (benchmarks/probe_criteria.py,
    docs/accuracy-notes.md: 0.077 on GSM8K vs 0.338 on the commonsense mix at x0.49 of the scaled preset, where the
    mean-loss increase is +4.0% vs +5.3%)."""
    from sparselora.tokens import IGNORE_INDEX

    total, count = 0.0, 0
    with _frozen(model) as state:
        for b in batches:
            mask = b["labels"][:, 1:] != IGNORE_INDEX
            if not mask.any():
                continue
            logp = []
            for sparse in (False, True):
                state.enabled = sparse
                logits = model(**b).logits
                logp.append(logits[:, :-1][mask])  # labelled positions only: (tokens, vocab)
                del logits
            dense, sparse_ = logp
            for i in range(0, dense.shape[0], chunk):
                d = torch.log_softmax(dense[i:i + chunk].float(), dim=-1)
                s = torch.log_softmax(sparse_[i:i + chunk].float(), dim=-1)
                total += float((d.exp() * (d - s)).sum())
            count += int(mask.sum())
    if not count:
        raise ValueError("frozen_kl needs at least one labelled token")
    return total / count


def calibrate(model, batches, bound: float = DEFAULT_LOSS_BOUND, factor: float = 0.7, max_rounds: int = 6) -> Calibration:
    """Back the applied config off until the frozen loss on ``batches`` rises by at most ``bound`` (relative);
    leaves the model with the chosen levels and returns what was measured."""
    if not batches:
        raise ValueError("calibrate needs at least one batch")
    if bound < 0 or not 0 < factor < 1 or max_rounds < 1:
        raise ValueError(f"need bound >= 0, 0 < factor < 1, max_rounds >= 1; got {bound}, {factor}, {max_rounds}")
    base = get_state(model).config
    cal = Calibration(base, frozen_loss(model, batches, sparse=False), bound)
    scale = 1.0
    for _ in range(max_rounds):
        cfg = scaled_config(base, scale)
        set_levels(model, cfg)
        loss = frozen_loss(model, batches, sparse=True)
        cal.rounds.append({"scale": scale, "sparse_loss": loss, "increase": loss / cal.dense_loss - 1.0})
        cal.config = cfg
        if cal.within_bound:
            break
        scale *= factor
    if not cal.within_bound:
        warnings.warn(cal.lines()[-1].strip(), stacklevel=2)
    return cal
