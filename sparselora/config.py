"""SparseLoRAConfig: which layers are sparse, how much, and how channels are chosen."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sparselora.selection import DEFAULT_SELECTOR, SAMPLE_ROWS, SELECTORS as _REGISTRY

SELECTORS = tuple(_REGISTRY)  # names, from the registry in sparselora.selection


def check_keys(cls, d: dict[str, Any], what: str, error: type[Exception] = ValueError) -> None:
    """Refuse keys of ``d`` that are not fields of the dataclass ``cls``: ``error("<what> [unknown]; known keys:
    [...]")``. The one unknown-key check of the package's configs (SparseLoRAConfig, RunConfig, run YAML)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"{what} {unknown}; known keys: {sorted(known)}")


def parse_layers(spec: int | str) -> list[int]:
    """Expand a layer key such as ``7``, ``"3-30"`` or ``"14-19,21-23"`` into indices.

    Ranges are inclusive on both ends, like the paper's tables ("layers 3-30").
    """
    if isinstance(spec, bool):
        raise ValueError(f"layer key {spec!r} is a bool; use an integer index or a range string like '3-30'")
    if isinstance(spec, int):
        return [spec]
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(
                f"cannot read layer key {spec!r}: use an integer index or ranges like '3-30' or '14-19,21-23'"
            ) from None
    return out


def _sparsity(name: str, layer: int, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}[{layer}] = {value!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name}[{layer}] = {value} is outside [0, 1): it is the fraction of channels removed "
            "for context tokens (0.9 keeps 10%); 1.0 would remove every channel"
        )
    return value


def _row_count(name: str, layer: int, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}[{layer}] = {value!r} must be a positive integer (sampled rows)")
    return value


def _expand(name: str, mapping: dict | None, read=_sparsity, what: str = "sparsity") -> dict:
    """A per-layer dict as written (layer keys or ranges like '3-30') -> {layer: value}, each value checked by
    ``read(name, layer, value)``."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise TypeError(f"{name} must be a dict of layer index -> {what}, got {type(mapping).__name__}")
    out: dict = {}
    for key, value in mapping.items():
        for layer in parse_layers(key):
            if layer < 0:
                raise ValueError(f"{name}: layer index {layer} is negative; layers count from 0")
            if layer in out:
                raise ValueError(f"{name}: layer {layer} is listed twice")
            out[layer] = read(name, layer, value)
    return dict(sorted(out.items()))


def _compact(mapping: dict[int, float]) -> dict[str, float]:
    """Inverse of `_expand` for readable YAML: consecutive layers with one value become 'a-b'."""
    out: dict[str, float] = {}
    items = sorted(mapping.items())
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][0] == items[j][0] + 1 and items[j + 1][1] == items[i][1]:
            j += 1
        lo, hi = items[i][0], items[j][0]
        out[str(lo) if lo == hi else f"{lo}-{hi}"] = items[i][1]
        i = j + 1
    return out


@dataclass
class SparseLoRAConfig:
    """Where and how SparseLoRA skips base-model work on context tokens.

    Sparsity values are the fraction of channels *removed* for context tokens; layers not listed stay dense.
    """

    ffn_sparsity: dict[int, float] = field(
        default_factory=dict,
        metadata={"help": "layer index (or 'a-b' range) -> fraction of FFN intermediate channels removed"},
    )
    attn_sparsity: dict[int, float] = field(
        default_factory=dict,
        metadata={"help": "layer index (or 'a-b' range) -> fraction of q/k and of v/o channels removed"},
    )
    estimator_rank: int = field(default=8, metadata={"help": "rank of the SVD estimator of each projection (selector svd)"})
    selector: str = field(
        default=DEFAULT_SELECTOR,
        metadata={"help": "how channels are chosen per batch: " + "; ".join(
            f"'{k}' ({v.help})" for k, v in _REGISTRY.items())},
    )
    sample_rows: int = field(
        default=SAMPLE_ROWS,
        metadata={"help": "context rows per batch whose true activations the sampled selector scores (evenly spaced)"},
    )
    ffn_sample_rows: dict[int, int] = field(
        default_factory=dict,
        metadata={"help": "layer index (or 'a-b' range) -> sampled rows of that FFN layer, instead of sample_rows; "
                          "set by `sparselora.calibrate.allocate_sample_rows` (sparselora finetune's probe), which "
                          "spreads sample_rows over the layers by what each needs"},
    )
    score_momentum: float = field(
        default=0.5,
        metadata={"help": "sampled selector, FFN: weight of the earlier batches in a layer's channel scores when "
                          "the sample is a small part of the batch (less as it covers more, none when it is the "
                          "whole batch; 0: each batch's sample alone)"},
    )
    sample_fp8: bool = field(
        default=True,
        metadata={"help": "sampled selector, FFN without adapters, on GPUs with fp8 tensor cores (sm89+): score the "
                          "sampled rows from an fp8 copy of gate/up (fp8 tensor cores have twice the bf16 rate; not "
                          "yet timed here. The same channels within measurement; +1 byte per gate/up weight of "
                          "each sparse FFN layer)"},
    )
    start_step: float = field(
        default=0.05,
        metadata={"help": "dense warm-up: a fraction of total steps if <= 1, else a step count"},
    )
    dense_output_tokens: bool = field(
        default=True, metadata={"help": "labelled (output) tokens always take the dense path"}
    )
    rope_pairs: bool = field(
        default=True,
        metadata={"help": "keep q/k channels d and d + head_dim/2 together, since RoPE rotates them as a pair"},
    )

    def __post_init__(self):
        self.ffn_sparsity = _expand("ffn_sparsity", self.ffn_sparsity)
        self.attn_sparsity = _expand("attn_sparsity", self.attn_sparsity)
        if isinstance(self.estimator_rank, bool) or not isinstance(self.estimator_rank, int) or self.estimator_rank < 1:
            raise ValueError(f"estimator_rank must be a positive integer, got {self.estimator_rank!r}")
        if isinstance(self.sample_rows, bool) or not isinstance(self.sample_rows, int) or self.sample_rows < 1:
            raise ValueError(f"sample_rows must be a positive integer, got {self.sample_rows!r}")
        self.ffn_sample_rows = _expand("ffn_sample_rows", self.ffn_sample_rows, _row_count, "rows")
        stray = sorted(set(self.ffn_sample_rows) - set(self.ffn_sparsity))
        if stray:
            raise ValueError(f"ffn_sample_rows names layer(s) {stray}, whose FFN is not in ffn_sparsity: rows are "
                             "sampled only where the FFN is sparse; remove them or add the layers to ffn_sparsity")
        if isinstance(self.score_momentum, bool) or not isinstance(self.score_momentum, (int, float)) or not (
                0 <= self.score_momentum < 1):
            raise ValueError(f"score_momentum must be in [0, 1) (0: no average over batches), got {self.score_momentum!r}")
        if not isinstance(self.sample_fp8, bool):
            raise ValueError(f"sample_fp8 must be true or false, got {self.sample_fp8!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector {self.selector!r} is unknown; choose one of {', '.join(SELECTORS)}")
        if _REGISTRY[self.selector].scores_labelled and not self.dense_output_tokens:
            raise ValueError(
                "selector='labelled' ranks channels by the labelled tokens' dense activations, so it needs "
                "dense_output_tokens=True; use selector='sampled' or 'svd' to make every token sparse"
            )
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, (int, float)) or self.start_step < 0:
            raise ValueError(
                f"start_step must be >= 0 (a fraction of total steps if <= 1, else a step count), got {self.start_step!r}"
            )
        if not self.is_sparse:
            warnings.warn(
                "SparseLoRAConfig leaves every layer dense (no ffn_sparsity or attn_sparsity > 0): training "
                "will run exactly like plain LoRA. Set ffn_sparsity/attn_sparsity or use a preset.",
                stacklevel=3,
            )

    def check_layers(self, num_layers: int) -> None:
        """A clear error when the config names layers the model does not have."""
        for name in ("ffn_sparsity", "attn_sparsity"):
            bad = [i for i in getattr(self, name) if i >= num_layers]
            if bad:
                raise ValueError(
                    f"{name} names layer(s) {bad}, but the model has {num_layers} layers (0-{num_layers - 1}); "
                    f"use SparseLoRAConfig.from_preset('scaled', num_layers={num_layers}) or fix the indices"
                )

    def ffn_rows(self, layer: int) -> int:
        """The sampled selector's rows in this layer's FFN (`ffn_sample_rows`, else `sample_rows`)."""
        return self.ffn_sample_rows.get(layer, self.sample_rows)

    @property
    def is_sparse(self) -> bool:
        return any(v > 0 for v in self.ffn_sparsity.values()) or any(v > 0 for v in self.attn_sparsity.values())

    def start_step_for(self, total_steps: int | None) -> int:
        """The first sparse step: `start_step` read as a fraction of `total_steps` when <= 1."""
        if self.start_step > 1:
            return int(self.start_step)
        if self.start_step == 0:
            return 0
        if not total_steps:
            raise ValueError(
                f"start_step={self.start_step} is a fraction of the run, so the total number of steps is "
                "needed; pass total_steps (the Trainer callback reads state.max_steps)"
            )
        return int(round(self.start_step * total_steps))

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ffn_sparsity"] = _compact(self.ffn_sparsity)
        d["attn_sparsity"] = _compact(self.attn_sparsity)
        d["ffn_sample_rows"] = _compact(self.ffn_sample_rows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseLoRAConfig":
        check_keys(cls, d, "unknown SparseLoRAConfig keys")
        return cls(**d)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from sparselora.io import atomic_write_text

            atomic_write_text(path, text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | Path) -> "SparseLoRAConfig":
        p = Path(path_or_text) if not (isinstance(path_or_text, str) and "\n" in path_or_text) else None
        if p is not None and not p.exists():
            raise FileNotFoundError(f"sparsity config {p} does not exist")
        text = p.read_text() if p is not None else str(path_or_text)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"sparsity config {path_or_text} must be a YAML mapping of SparseLoRAConfig fields")
        return cls.from_dict(data)

    # -- presets ---------------------------------------------------------------------------------------------
    @staticmethod
    def presets() -> list[str]:
        names = [p.name[:-5] for p in resources.files("sparselora.presets").iterdir() if p.name.endswith(".yaml")]
        return sorted(names) + ["scaled"]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SparseLoRAConfig":
        """A published configuration from the paper, or ``"scaled"`` for any depth (see `scaled`)."""
        if name == "scaled":
            return cls.scaled(**overrides)
        path = resources.files("sparselora.presets") / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(cls.presets())}")
        data = yaml.safe_load(path.read_text())
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def scaled(
        cls,
        num_layers: int | None = None,
        ffn_sparsity: float = 0.9,
        attn_sparsity: float = 0.5,
        **overrides,
    ) -> "SparseLoRAConfig":
        """The paper's layer pattern for any depth: the first ~10% of layers and the last stay dense,
        the FFN is sparse in all others, attention only in the upper half (its early layers are sensitive)."""
        if not isinstance(num_layers, int) or num_layers < 3:
            raise ValueError("the 'scaled' preset needs num_layers (an integer >= 3), e.g. num_layers=24")
        first = max(1, round(0.1 * num_layers))
        last = num_layers - 1
        ffn = {i: ffn_sparsity for i in range(first, last)}
        attn = {i: attn_sparsity for i in range(max(first, num_layers // 2), last)}
        return cls(ffn_sparsity=ffn, attn_sparsity=attn, **overrides)
