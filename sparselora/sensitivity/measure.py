"""Measuring layer-wise sensitivity: for a frozen model (optionally with a LoRA adapter) and a small calibration
slice of the fine-tuning data, `measure_sensitivity` records the loss increase on the labelled tokens when *one*
layer's FFN, or *one* layer's attention, alone runs the SparseLoRA sparse path at each sparsity level, everything
else dense. It uses the library's own sparse path (`apply_sparselora` with a one-layer config, start_step 0), so
what is measured is exactly what training would compute.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sparselora.config import SparseLoRAConfig
from sparselora.models.registry import arch_info, causal_lm, decoder_layers
from sparselora.patch import apply_sparselora, get_state, remove_sparselora
from sparselora.selection import DEFAULT_SELECTOR
from sparselora.tokens import IGNORE_INDEX


KINDS = ("ffn", "attn")
KIND_NAMES = {"ffn": "FFN", "attn": "attention"}


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
    selector: str = DEFAULT_SELECTOR
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
            selector=d.get("selector", "svd"),  # a record without the field predates other selectors
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


def one_layer_config(kind: str, layer: int, level: float, selector: str, rank: int, rope_pairs: bool):
    key = "ffn_sparsity" if kind == "ffn" else "attn_sparsity"
    return SparseLoRAConfig(
        **{key: {layer: level}}, estimator_rank=rank, selector=selector, start_step=0, rope_pairs=rope_pairs
    )


def measure_sensitivity(
    model,
    batches: Sequence[dict[str, torch.Tensor]],
    levels: Sequence[float],
    selector: str = DEFAULT_SELECTOR,
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
                    cfg = one_layer_config(kind, layer, level, selector, estimator_rank, rope_pairs)
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

