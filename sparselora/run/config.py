"""A fine-tuning run's configuration: `RunConfig` (every setting a run depends on; YAML keys are its field
names), reading a run-config YAML, absolute paths, the SparseLoRA config a run names, and what `--resume` merges
(the saved settings; this machine's settings, `MACHINE_FIELDS`, are never compared)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparselora.calibrate import CRITERIA, DEFAULT_KL_BOUND, DEFAULT_LOSS_BOUND
from sparselora.config import check_keys
from sparselora.errors import SparseLoRAError
from sparselora.models.registry import ATTN_PROJS, PROJS

TARGET_NAMES = PROJS
PATH_FIELDS = ("model", "data", "output", "sparsity", "estimator_dir", "cache_dir")
# settings of this machine, not of the run: a resumed run takes them from the command line, never compares them
MACHINE_FIELDS = ("output", "threads", "estimator_dir", "cache_dir")


class RunError(SparseLoRAError, ValueError):
    """A run cannot start or continue as asked; the message says what to do."""


@dataclass
class RunConfig:
    """Everything a fine-tuning run depends on. YAML keys are these field names."""

    model: str | None = None
    data: str | None = None
    output: str | None = None
    sparsity: str | None = None  # a preset name, a YAML file, or None: the `scaled` preset for the model's depth
    dense: bool = False
    lora_r: int = 32
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(ATTN_PROJS))  # the paper's setting
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.04  # a fraction of the steps if < 1, else a step count
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs; -1: not set (train for `epochs`)
    epochs: float = 1.0
    max_length: int = 512
    seed: int = 42
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    gradient_checkpointing: bool = False
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int | None = None  # None: every step on CPU, every 10 on a GPU (a log reads the loss: a sync)
    data_format: str = "auto"
    skip_bad_lines: bool = False
    limit: int | None = None  # use only the first N examples
    heldout: int = 0  # the last N examples are not trained on; their dense-evaluated loss is reported at the end
    merge: bool = False
    estimator_dir: str | None = "~/.cache/sparselora/estimators"
    cache_dir: str | None = None  # converted-model cache (default: $SPARSELORA_CACHE or ~/.cache/sparselora/models)
    threads: int | None = None  # torch CPU threads (None or 0: `default_threads()`, the rule of every command)
    # The training path (sparselora.fastpath.choose_path); None: the fastest correct one for the machine (on a GPU:
    # packed rows, fused kernels and CUDA graphs where they apply), printed with its reasons at the start.
    fast_kernels: bool | None = None  # fused RMSNorm/SiLU*up and a labelled-only LM head (dense and sparse alike)
    cuda_graphs: bool | None = None  # forward + backward replayed from CUDA graphs (sparselora.CUDAGraphTrainer)
    packing: bool | None = None  # rows packed to a fixed token budget, attention isolated per example
    # before training, the frozen model with the whole config on the first batches is compared with dense, and the
    # config is scaled down until it is within the bound (sparselora.calibrate). probe "loss": the mean loss may rise
    # at most loss_bound (relative); probe "kl": the mean KL(dense || sparse) over labelled tokens at most kl_bound
    # nats. loss_bound None: no probe.
    loss_bound: float | None = DEFAULT_LOSS_BOUND
    probe: str = "kl"
    kl_bound: float = DEFAULT_KL_BOUND

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = [t[:-5] if t.endswith("_proj") else t for t in self.lora_targets]
        bad = [t for t in self.lora_targets if t not in TARGET_NAMES]
        if bad or not self.lora_targets:
            raise RunError(f"lora_targets {bad or self.lora_targets} unknown; choose from {','.join(TARGET_NAMES)}")
        for name in ("lora_r", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            v = getattr(self, name)
            if v is None and name == "logging_steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RunError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, got {v!r}")
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            raise RunError(f"max_steps (--max-steps) must be an integer, got {self.max_steps!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise RunError(f"max_steps (--max-steps) must be >= 1, got {self.max_steps} (leave it out to train "
                           "for --epochs instead)")
        if self.max_steps == -1 and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise RunError(f"epochs (--epochs) must be > 0, got {self.epochs!r} (or give --max-steps)")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise RunError(f"limit (--limit) must be a positive number of examples, got {self.limit!r} "
                           "(leave it out to use the whole file)")
        if not isinstance(self.warmup, (int, float)) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise RunError(f"warmup (--warmup) must be >= 0 (a fraction of the steps if < 1, else a step count), "
                           f"got {self.warmup!r}")
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise RunError(f"warmup (--warmup) >= 1 is a number of steps and must be whole, got {self.warmup}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 0):
            raise RunError(f"threads (--threads) must be >= 1 (or 0 for the default rule), got {self.threads!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RunError(f"dtype {self.dtype!r} unknown; choose auto, float32, bfloat16 or float16")
        if not 0 <= self.lora_dropout < 1:
            raise RunError(f"lora_dropout (--lora-dropout) must be in [0, 1), got {self.lora_dropout}")
        if self.loss_bound is not None and (isinstance(self.loss_bound, bool) or not isinstance(
                self.loss_bound, (int, float)) or self.loss_bound < 0):
            raise RunError(f"loss_bound (--loss-bound) must be >= 0 (a relative loss increase, e.g. 0.05) or off, "
                           f"got {self.loss_bound!r}")
        if self.probe not in CRITERIA:
            raise RunError(f"probe (--probe) must be one of {', '.join(CRITERIA)}, got {self.probe!r}")
        if isinstance(self.kl_bound, bool) or not isinstance(self.kl_bound, (int, float)) or self.kl_bound < 0:
            raise RunError(f"kl_bound (--kl-bound) must be >= 0 (nats per labelled token, e.g. 0.1), got "
                           f"{self.kl_bound!r}")
        if isinstance(self.heldout, bool) or not isinstance(self.heldout, int) or self.heldout < 0:
            raise RunError(f"heldout (--heldout) must be a number of examples >= 0, got {self.heldout!r}")
        if self.learning_rate <= 0:
            raise RunError(f"learning_rate (--lr) must be > 0, got {self.learning_rate}")
        if self.cuda_graphs and (self.gradient_checkpointing or self.dtype == "float16"):
            raise RunError("cuda_graphs needs no gradient checkpointing and bfloat16/float32; turn cuda_graphs off "
                           "(--no-cuda-graphs) or change those")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "run config") -> "RunConfig":
        check_keys(cls, d, f"{source}: unknown key(s)", RunError)
        try:
            return cls(**d)
        except TypeError as exc:
            raise RunError(f"{source}: {exc}") from None


def read_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise RunError(f"run config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RunError(f"run config {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RunError(f"run config {p} must be a YAML mapping of run settings (e.g. `lora_r: 16`)")
    check_keys(RunConfig, data, f"run config {p}: unknown key(s)", RunError)
    return data


# ------------------------------------------------------------------------------------------- helpers


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def sparsity_config(spec: str | None, num_layers: int):
    """A SparseLoRAConfig from a preset name, a YAML file, or None (the `scaled` preset for this depth),
    checked against the model's depth."""
    sp = _sparsity_config(spec, num_layers)
    try:
        sp.check_layers(num_layers)
    except ValueError:
        bad = sorted({i for d in (sp.ffn_sparsity, sp.attn_sparsity) for i in d if i >= num_layers})
        raise RunError(
            f"--sparsity {spec}: names layer(s) {bad}, but the model has {num_layers} layers (0-{num_layers - 1}); "
            "fix the indices, or leave --sparsity out for the 'scaled' preset of this depth"
        ) from None
    return sp


def _sparsity_config(spec: str | None, num_layers: int):
    from sparselora.config import SparseLoRAConfig

    if spec is None or spec == "scaled":
        if num_layers < 3:
            raise RunError(f"the 'scaled' sparsity preset needs a model of at least 3 layers, this one has "
                           f"{num_layers}; pass --sparsity FILE.yaml naming its layers, or --dense")
        return SparseLoRAConfig.from_preset("scaled", num_layers=num_layers)
    if spec in SparseLoRAConfig.presets():
        return SparseLoRAConfig.from_preset(spec)
    p = Path(spec).expanduser()
    if p.is_file():
        try:
            return SparseLoRAConfig.from_yaml(p)
        except (ValueError, TypeError, yaml.YAMLError) as exc:
            raise RunError(f"sparsity config {p}: {exc}") from None
    if spec.endswith((".yaml", ".yml")) or os.sep in spec:
        raise RunError(f"sparsity config file {spec} does not exist")
    raise RunError(
        f"--sparsity {spec!r} is neither a preset nor a YAML file; presets: {', '.join(SparseLoRAConfig.presets())}"
    )


def _resolved_path(value: str | None, must_exist: bool = True) -> str | None:
    """An absolute path for a path-like value that names something on disk (aliases and presets stay names)."""
    if value is None:
        return None
    p = Path(value).expanduser()
    if must_exist and not p.exists():
        return value
    return str(p.resolve())


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with absolute paths (so that --resume works from any folder and compares like with like)."""
    out = dataclasses.replace(cfg)
    for name in ("model", "data", "sparsity"):
        setattr(out, name, _resolved_path(getattr(cfg, name)))
    for name in ("output", "estimator_dir", "cache_dir"):
        setattr(out, name, _resolved_path(getattr(cfg, name), must_exist=False))
    return out


def merge_for_resume(saved: dict[str, Any], given: RunConfig) -> RunConfig:
    """The saved configuration; a setting given now that differs from it is an error (it would change the run).
    Paths are compared resolved; this machine's settings (`MACHINE_FIELDS`) come from ``given`` when set."""
    base = resolve_paths(RunConfig.from_dict(saved, source="saved run_config.yaml"))
    defaults = RunConfig()
    diffs = []
    for f in dataclasses.fields(RunConfig):
        if f.name in MACHINE_FIELDS:
            continue
        new, old, dflt = getattr(given, f.name), getattr(base, f.name), getattr(defaults, f.name)
        if new is not None and new != dflt and new != old:
            diffs.append(f"{f.name}: saved {old!r}, given {new!r}")
    if diffs:
        raise RunError(
            "--resume continues the saved run with its own settings; these differ: " + "; ".join(diffs)
            + ". Drop them, or start a new run in another folder."
        )
    for name in MACHINE_FIELDS:
        new = getattr(given, name)
        # output and threads always come from now (the thread rule is this machine's); the caches keep the saved
        # folders unless others are given
        if name in ("output", "threads") or (new is not None and new != getattr(resolve_paths(defaults), name)):
            setattr(base, name, new)
    return base
