"""The fine-tuning runner behind `sparselora finetune` and `sparselora demo`.

    from sparselora.train import RunConfig, finetune
    summary = finetune(RunConfig(model="smollm2-135m", data="train.jsonl", output="runs/sparse", max_steps=50))

One code path for both baselines: a PEFT LoRA model trained by `transformers.Trainer`; with sparsity on,
`apply_sparselora` + `SparseLoRACallback`, with ``dense=True`` the plain PEFT model. The output folder holds

    run_config.yaml   the resolved run configuration (what --resume continues)
    sparsity.yaml     the SparseLoRA configuration (also written for dense runs: what the FLOPs compare with)
    checkpoints/      Trainer checkpoints (adapter, optimizer, scheduler, RNG, trainer state)
    adapter/          the LoRA adapter in plain PEFT format (PeftModel.from_pretrained, no sparselora needed)
    merged/           base + adapter merged (with merge=True)
    summary.json      config, versions, steps, wall time, tokens/s, analytic FLOPs, losses
    loss.png          the loss curve, overlaid with sibling runs of the same data (dense vs sparse)

Every file is written atomically; folders are written to a temporary sibling and renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from sparselora.errors import SparseLoRAError
from sparselora.io import atomic_write_json, atomic_write_text
from sparselora.models.registry import ATTN_PROJS, PROJS, module_name
from sparselora.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)

RUN_FILES = ("run_config.yaml", "sparsity.yaml", "summary.json", "loss.png", "checkpoints", "adapter", "merged")
TARGET_NAMES = PROJS
CHECKPOINTS = "checkpoints"


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
    logging_steps: int = 1
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
    # before training, the frozen model's loss with the whole config on the first batches may rise at most this
    # much (relative) over dense; the config is scaled down until it does (sparselora.calibrate). None: no probe.
    loss_bound: float | None = 0.05

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = [t[:-5] if t.endswith("_proj") else t for t in self.lora_targets]
        bad = [t for t in self.lora_targets if t not in TARGET_NAMES]
        if bad or not self.lora_targets:
            raise RunError(f"lora_targets {bad or self.lora_targets} unknown; choose from {','.join(TARGET_NAMES)}")
        for name in ("lora_r", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            v = getattr(self, name)
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RunError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
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
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunError(f"run config {p}: unknown key(s) {unknown}; known keys: {sorted(known)}")
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("sparselora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover
        pass
    return out


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The CPU thread rule of every command (finetune, eval, sensitivity, demo): half the usable cores, at most 4
    (1 on a 2-core machine). torch's own default (every core) is many times slower on a busy machine, where
    other processes hold some of the cores; on a GPU the CPU threads hardly matter."""
    return max(1, min(4, usable_cores() // 2))


MMAP_THRESHOLD = 256 * 1024


def return_freed_memory() -> bool:
    """Make glibc give freed tensor memory back to the system (Linux; a no-op elsewhere or when the user set
    MALLOC_MMAP_THRESHOLD_). glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), so
    after the first step most activation tensors come from the heap, whose holes are never returned: a CPU run held
    every step's activations as resident memory (SmolLM2-135M, batch 4: 5.6 GB peak, 4.3 GB held between steps).
    A fixed 256 KB threshold (which also turns the dynamic one off) maps large tensors and unmaps them when freed:
    4.3 GB peak, the same step times (measured). Returns whether the setting was applied."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no such knob)
        return False


def set_threads(threads: int | None) -> int:
    """Apply ``threads`` (None or 0: `default_threads()`) to torch; returns the number set."""
    import torch

    n = threads if threads else default_threads()
    torch.set_num_threads(n)
    return n


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder via a temporary sibling and a rename (the previous folder is replaced)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def last_checkpoint(output: Path) -> Path | None:
    """The newest complete Trainer checkpoint (one with trainer_state.json) under output/checkpoints."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and (p / "trainer_state.json").is_file():
            try:
                done.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return max(done)[1] if done else None


ASIDE_PREFIX = ".replaced-"  # a previous run moved aside by --overwrite until the new one has replaced it


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def check_output(output: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the output folder without changing it; returns the saved run config dict when resuming."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise RunError(f"output {output} exists and is not a folder")
    if resume:
        cfg = output / "run_config.yaml"
        if not cfg.is_file():
            raise RunError(f"nothing to resume in {output}: it has no run_config.yaml (start the run without --resume)")
        try:
            saved = yaml.safe_load(cfg.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RunError(f"{cfg} is not valid YAML ({exc}); start a new run with --overwrite") from None
        if not isinstance(saved, dict):
            raise RunError(f"{cfg} is not a run configuration; start a new run with --overwrite")
        return saved
    if output.is_dir() and any(not p.name.startswith(ASIDE_PREFIX) for p in output.iterdir()):
        if not is_run_dir(output):
            raise RunError(
                f"output folder {output} is not empty and holds no sparselora run; choose a new or empty folder"
            )
        if not overwrite:
            raise RunError(
                f"output folder {output} already holds a run; pass --resume to continue it or --overwrite to "
                "replace it"
            )
    return None


def _set_aside(output: Path) -> Path | None:
    """Move the previous run's files into a hidden folder inside ``output`` (restored if the new run fails)."""
    present = [n for n in RUN_FILES if (output / n).exists()]
    if not present:
        return None
    aside = output / f"{ASIDE_PREFIX}{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for n in present:
        os.replace(output / n, aside / n)
    return aside


def _remove_run_files(output: Path) -> None:
    for n in RUN_FILES:
        p = output / n
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _abandon(output: Path, aside: Path | None, created: bool) -> str | None:
    """After a failed start: undo what this run wrote unless it has a checkpoint to resume from, and put a
    previous run that --overwrite moved aside back. Returns a note for the user (or None)."""
    if last_checkpoint(output) is not None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            return "the previous run was replaced by this one (continue it with --resume)"
        return None
    _remove_run_files(output)
    if aside is not None:
        for p in aside.iterdir():
            os.replace(p, output / p.name)
        aside.rmdir()
        note = f"the previous run in {output} is kept as it was"
    else:
        note = None
    if created:
        with contextlib.suppress(OSError):
            output.rmdir()  # only when empty
    return note


def finished_summary(output: Path) -> dict[str, Any] | None:
    """The summary of a run that reached its last step and wrote its adapter (None otherwise)."""
    from sparselora.report import read_summary

    s = read_summary(output)
    if not s or not (output / "adapter").is_dir():
        return None
    steps, total = s.get("steps"), s.get("max_steps")
    if not isinstance(steps, int) or not isinstance(total, int) or steps < total:
        return None
    ckpt = last_checkpoint(output)
    if ckpt is not None and int(ckpt.name.split("-", 1)[1]) > steps:  # pragma: no cover - a later run's checkpoint
        return None
    return s


def token_counts(features: Sequence[dict]) -> dict[str, float]:
    """Average sequence length, labelled and context tokens per example."""
    lens = [len(f["input_ids"]) for f in features]
    lab = [sum(1 for v in f["labels"] if v != IGNORE_INDEX) for f in features]
    n = len(features)
    return {
        "examples": n,
        "mean_tokens": sum(lens) / n,
        "mean_labelled": sum(lab) / n,
        "mean_context": (sum(lens) - sum(lab)) / n,
        "total_tokens": sum(lens),
    }


def analytic_flops(model_config, sp_cfg, batch_size: int, counts: dict, lora_r: int, targets,
                   labelled_only_head: bool = False) -> dict[str, Any]:
    from sparselora.flop_count import flops

    T = max(1, round(counts["mean_tokens"]))
    L = min(T, round(counts["mean_labelled"]))
    f = flops(model_config, sp_cfg, (batch_size, T), L, lora_rank=lora_r, lora_targets=tuple(targets),
              labelled_only_head=labelled_only_head)
    return {"batch_shape": [batch_size, T], "labelled_per_row": L, **f, "speedup": f["dense"] / f["sparse"]}


# ------------------------------------------------------------------------------------------- schedule


def warmup_steps(warmup: float, total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``warmup`` < 1 is a fraction of the run (rounded down), else a count."""
    if warmup < 1:
        return int(warmup * total_steps)
    return int(warmup)


def lr_factor_with_warmup(base: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    """The scheduler's factor with a warm-up whose first step trains: step k (0-based) of a warm-up of w steps
    runs at (k + 1) / (w + 1) of the rate (transformers' warm-up starts at 0, so a run's first step would not
    train at all); after it, ``base`` (the scheduler's own decay, computed for the same w)."""

    def factor(step: int) -> float:
        return (step + 1) / (warmup + 1) if step < warmup else base(step)

    return factor


def make_scheduler(name: str, optimizer, warmup: float, total_steps: int, kwargs: dict | None = None):
    """A transformers scheduler ``name`` with `lr_factor_with_warmup`'s warm-up (LambdaLR schedulers)."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    w = warmup_steps(warmup, total_steps)
    sched = get_scheduler(name, optimizer=optimizer, num_warmup_steps=w, num_training_steps=total_steps,
                          scheduler_specific_kwargs=kwargs or {})
    if w == 0 or not isinstance(sched, LambdaLR):
        return sched
    for group, base_lr in zip(optimizer.param_groups, sched.base_lrs):  # undo the first scheduler's lr
        group["lr"] = base_lr
    return LambdaLR(optimizer, [lr_factor_with_warmup(f, w) for f in sched.lr_lambdas])


def check_scheduler(name: str) -> None:
    from transformers.trainer_utils import SchedulerType

    choices = [t.value for t in SchedulerType]
    if name not in choices:
        raise RunError(f"--lr-scheduler {name!r} is unknown; choose one of {', '.join(choices)}")


# ------------------------------------------------------------------------------------------- callbacks


class _TokenCounter:
    """Real (attention_mask == 1) tokens of the batches the trainer has trained on (not those it prefetched)."""

    def __init__(self):
        self.tokens = 0
        self.unlabelled_batches = 0

    def add(self, inputs) -> None:
        mask = inputs.get("attention_mask")
        ids = inputs.get("input_ids")
        self.tokens += int(mask.sum()) if mask is not None else int(ids.numel()) if ids is not None else 0
        labels = inputs.get("labels")
        if labels is not None and not bool((labels[..., 1:] != IGNORE_INDEX).any()):
            self.unlabelled_batches += 1
            if self.unlabelled_batches == 1:
                logger.warning(
                    "sparselora: a batch has no labelled token (every label is -100, e.g. prompts longer than "
                    "--max-length or empty targets): its loss is 0/0 = NaN and it teaches nothing. Check the data's "
                    "targets and --max-length."
                )


def run_trainer_class(base):
    """``base`` (a transformers.Trainer class) plus what `finetune` needs of it: the tokens of each trained batch
    are counted (``token_counter``), and the warm-up's first step trains (`make_scheduler`)."""

    class RunTrainer(base):
        token_counter: _TokenCounter | None = None
        warmup: float = 0.0

        def training_step(self, model, inputs, *args, **kwargs):
            if self.token_counter is not None:
                self.token_counter.add(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = make_scheduler(self.args.lr_scheduler_type, optimizer or self.optimizer,
                                                   self.warmup, num_training_steps, self.args.lr_scheduler_kwargs)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    RunTrainer.__name__ = RunTrainer.__qualname__ = f"Run{base.__name__}"
    return RunTrainer


def build_trainer(cfg: RunConfig, path, model, tokenizer, features, args, callbacks, counter: _TokenCounter):
    """The Trainer of a run and its collator: the one place that chooses them, after the run's `TrainingPath`
    (plain `transformers.Trainer` or `CUDAGraphTrainer`; padded batches of `DataCollator` or packed rows of
    `PackedCollator`). ``counter`` counts the tokens of each trained batch (`StepTimer` reads it)."""
    from sparselora.data import DataCollator
    from sparselora.fastpath import packed_data

    if path.cuda_graphs:
        from sparselora.trainer import CUDAGraphTrainer as base
    else:
        from transformers import Trainer as base
    if path.packed:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        data, collator = packed_data(features, path, pad)
    else:
        data, collator = features, DataCollator(tokenizer)
    trainer = run_trainer_class(base)(model=model, args=args, train_dataset=_ListDataset(data),
                                      data_collator=collator, callbacks=list(callbacks))
    trainer.token_counter, trainer.warmup = counter, cfg.warmup
    return trainer


def _callbacks():
    """Trainer callbacks, built lazily (transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and tokens of each optimizer step; whether sparsity was on; RNG at each step start."""

        def __init__(self, counter: _TokenCounter, model):
            self.counter, self.model = counter, model
            self.steps: list[dict[str, float]] = []
            self._t0 = None
            self._tok0 = 0
            self.rng = None

        def on_step_begin(self, args, state, control, **kw):
            self.rng = _rng_state()
            self._t0 = time.perf_counter()
            self._tok0 = self.counter.tokens

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is None:
                return
            from sparselora.patch import get_state

            st = get_state(self.model, required=False)
            self.steps.append(
                {
                    "step": state.global_step,
                    "seconds": time.perf_counter() - self._t0,
                    "tokens": self.counter.tokens - self._tok0,  # counted in training_step: this step's batches
                    "sparse": bool(st is not None and st.active),
                }
            )
            self.rng = None

    class SparsityGuard(TrainerCallback):
        """Warns once when sparsity is scheduled on but a step's forward ran dense because it got no labels
        (a trainer that computes the loss itself): SparseLoRA needs `labels` to find the context tokens."""

        def __init__(self, model):
            self.model, self.warned = model, False

        def on_step_end(self, args, state, control, **kw):
            from sparselora.patch import get_state

            st = get_state(self.model, required=False)
            if st is not None and st.active and st.split is None and not self.warned:
                self.warned = True
                logger.warning(
                    "sparselora: sparsity is on but the last forward ran dense: it received no `labels` (or no "
                    "context token). Pass labels (-100 on prompt tokens) to the model's forward."
                )

    class Progress(TrainerCallback):
        """One progress bar: loss, learning rate, tokens/s, current sparsity, ETA. A step that logs is shown
        when its log arrives (after on_step_end), so the bar at step n shows step n's loss and rate."""

        def __init__(self, timer: StepTimer, model, enabled: bool = True, label: str = "train"):
            self.timer, self.model, self.enabled, self.label = timer, model, enabled, label
            self.bar = None
            self.last: dict[str, float] = {}
            self.shown: list[tuple[int, dict[str, str]]] = []  # (step, postfix) as rendered

        def on_train_begin(self, args, state, control, **kw):
            if not self.enabled:
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            self._render(state)

        def on_step_end(self, args, state, control, **kw):
            if not (control.should_log or (args.logging_steps and state.global_step % args.logging_steps == 0)):
                self._render(state)  # no log follows this step

        def _render(self, state):
            if self.bar is None:
                return
            from sparselora.patch import get_state

            recent = self.timer.steps[-5:]
            secs = sum(s["seconds"] for s in recent)
            post = {}
            if "loss" in self.last:
                post["loss"] = f"{self.last['loss']:.4f}"
            if "learning_rate" in self.last:
                post["lr"] = f"{self.last['learning_rate']:.2e}"
            if secs > 0:
                post["tok/s"] = f"{sum(s['tokens'] for s in recent) / secs:.0f}"
            st = get_state(self.model, required=False)
            if st is None or not st.enabled:
                post["sparsity"] = "off (dense)"
            elif not st.active:
                post["sparsity"] = "warm-up (dense)"
            else:
                ffn = self.last.get("sparselora/ffn_kept")
                post["sparsity"] = f"on, ffn kept {ffn:.0%}" if ffn is not None else "on"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(state.global_step - self.bar.n)
            self.bar.refresh()
            self.shown.append((state.global_step, post))

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepTimer, SparsityGuard, Progress


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.random.get_rng_state()  # the Trainer's non-distributed format
    return st


class _ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# ------------------------------------------------------------------------------------------- the run

PATH_FIELDS = ("model", "data", "output", "sparsity", "estimator_dir", "cache_dir")
# settings of this machine, not of the run: a resumed run takes them from the command line, never compares them
MACHINE_FIELDS = ("output", "threads", "estimator_dir", "cache_dir")


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


def runtime_notes(cfg: RunConfig, cuda: bool) -> list[str]:
    """What actually runs where a setting means something else on this machine."""
    notes = []
    if not cuda and cfg.dtype == "float16":
        notes.append("--dtype float16 on a CPU: the weights are float16 and train in float16 without loss scaling "
                     "(slow on most CPUs; small gradients may vanish); --dtype float32 is the CPU default")
    if not cuda and cfg.dtype == "bfloat16":
        notes.append("--dtype bfloat16 on a CPU: weights and activations are bfloat16 (no mixed precision on CPU)")
    if not cuda and cfg.cuda_graphs:
        notes.append("--cuda-graphs without a GPU: nothing is captured, each step runs eagerly (the same numbers)")
    return notes


PROBE_BATCHES = 2  # batches of the run's first examples the sparsity probe measures


def _calibrate(model, tokenizer, features, cfg: RunConfig, use_cpu: bool):
    """The sparsity probe (sparselora.calibrate) on the run's first batches, padded, on the training device."""
    from sparselora.calibrate import calibrate
    from sparselora.data import DataCollator

    if not use_cpu:
        model.to("cuda")
    device = next(model.parameters()).device
    collate, n = DataCollator(tokenizer), cfg.batch_size
    batches = [{k: v.to(device) for k, v in collate(features[i * n:(i + 1) * n]).items()}
               for i in range(max(1, min(PROBE_BATCHES, len(features) // n)))]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its lines say it, including the warning
        return calibrate(model, batches, bound=cfg.loss_bound)


def _heldout_loss(model, tokenizer, features, batch_size: int) -> float:
    """The trained adapter's loss on held-out examples, evaluated dense (padded batches, SDPA): the fair comparison
    of a sparse and a dense run, since a sparse run's training loss includes the sparse forward's approximation."""
    from sparselora.calibrate import frozen_loss
    from sparselora.data import DataCollator
    from sparselora.models.registry import causal_lm

    causal_lm(model).set_attn_implementation("sdpa")  # packed attention needs packed batches
    device = next(model.parameters()).device
    collate = DataCollator(tokenizer)
    batches = [{k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
               for i in range(0, len(features), batch_size)]
    return frozen_loss(model, batches, sparse=False)


def finetune(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    label: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune as configured and write the run folder; returns the summary dict.

    ``resume=True`` continues the run in ``cfg.output`` from its last checkpoint with its saved configuration
    (same schedule and data order); a finished run is left as it is (its summary is returned). ``overwrite=True``
    replaces a previous run, but only once the new one has started: until then (and if the new one fails before
    its first checkpoint) the old one is kept. Nothing is written before every setting has been checked and the
    model and data have loaded. ``callbacks`` are extra `TrainerCallback`s. A KeyboardInterrupt saves a
    checkpoint and re-raises after printing how to resume.
    """
    say = echo or (lambda s: print(s, file=sys.stderr))
    if not cfg.model or not cfg.data or not cfg.output:
        raise RunError("model, data and output are required")
    cfg = resolve_paths(cfg)
    output = Path(cfg.output)
    saved = check_output(output, resume, overwrite)
    if saved is not None:
        cfg = _merge_for_resume(saved, cfg)
        done = finished_summary(output)
        if done is not None:
            say(f"{output} already finished ({done['steps']} of {done['max_steps']} steps): nothing to do. Start "
                "a longer run in a new folder, or replace this one with --overwrite.")
            return dict(done, already_finished=True)
    check_scheduler(cfg.lr_scheduler)

    import torch

    set_threads(cfg.threads)
    return_freed_memory()
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from sparselora import SparseLoRACallback, apply_sparselora, remove_sparselora, set_enabled
    from sparselora.data import load_examples, tokenize_examples
    from sparselora.models import load_model
    from sparselora.models.registry import arch_info

    use_cpu = not torch.cuda.is_available()
    for note in runtime_notes(cfg, cuda=not use_cpu):
        say(f"note: {note}")
    dtype = resolve_dtype(cfg.dtype)
    examples = load_examples(cfg.data, fmt=cfg.data_format, skip_bad_lines=cfg.skip_bad_lines, limit=cfg.limit)
    model, tokenizer = load_model(cfg.model, dtype=dtype, cache_dir=cfg.cache_dir)
    arch = arch_info(model.config)  # a clear error for unsupported families before any work
    sp_cfg = sparsity_config(cfg.sparsity, arch.num_layers)
    features, tok_stats = tokenize_examples(examples, tokenizer, max_length=cfg.max_length)
    del examples[:]  # the examples' text is not needed any more (the features and the counts are)
    heldout = []
    if cfg.heldout:
        if cfg.heldout >= len(features):
            raise RunError(f"--heldout {cfg.heldout} leaves nothing to train on ({len(features)} examples)")
        features, heldout = features[:-cfg.heldout], features[-cfg.heldout:]
    counts = token_counts(features)
    from sparselora.fastpath import choose_path

    try:
        path = choose_path("cpu" if use_cpu else "cuda", [len(f["input_ids"]) for f in features], cfg.batch_size,
                           gradient_checkpointing=cfg.gradient_checkpointing,
                           world_size=int(os.environ.get("WORLD_SIZE", "1")), dtype=str(dtype).split(".")[-1],
                           packing=cfg.packing, cuda_graphs=cfg.cuda_graphs, fast_kernels=cfg.fast_kernels)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    say(path.describe())

    torch.manual_seed(cfg.seed)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=[module_name(t) for t in cfg.lora_targets], task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    estimator_dir = Path(cfg.estimator_dir).expanduser() if cfg.estimator_dir else None
    # the dense baseline runs the same patched model with the sparse path switched off. The estimator's small
    # float64 eigendecompositions run single-threaded: on a busy CPU, multi-threaded LAPACK is up to 100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apply_sparselora(model, sp_cfg, estimator_dir=estimator_dir, fast_kernels=path.fast_kernels)
    finally:
        torch.set_num_threads(threads)
    if cfg.dense:
        set_enabled(model, False)
    calibration = None
    if not cfg.dense and cfg.loss_bound is not None and sp_cfg.is_sparse:
        calibration = _calibrate(model, tokenizer, features, cfg, use_cpu)
        sp_cfg = calibration.config
        for line in calibration.lines():
            say(line)
    if not cfg.dense:
        from sparselora.fastpath import flop_cut_warning

        base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        cut = analytic_flops(base_config, sp_cfg, cfg.batch_size * cfg.grad_accum, counts, cfg.lora_r,
                             cfg.lora_targets, path.fast_kernels)["speedup"]
        warning = flop_cut_warning(cut)
        say(f"warning: {warning}" if warning else f"analytic FLOP cut of the sparsity config: {cut:.2f}x")
    if path.packed:
        from sparselora import use_packed_attention

        use_packed_attention(model)

    args = TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=1 if path.packed else cfg.batch_size,  # a packed row holds ~batch_size examples
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=0,  # the warm-up is make_scheduler's (cfg.warmup), whose first step trains
        weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16 and not use_cpu,
        fp16=dtype == torch.float16 and not use_cpu,
        use_cpu=use_cpu,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        save_only_model=False,
    )

    # everything is checked and loaded: the run starts, and only now is the output folder changed
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    aside = _set_aside(output) if overwrite else None
    trainer = None
    try:
        atomic_write_text(output / "run_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        sp_cfg.to_yaml(output / "sparsity.yaml")
        StepTimer, SparsityGuard, Progress = _callbacks()
        counter = _TokenCounter()
        timer = StepTimer(counter, model)
        run_label = label or ("dense" if cfg.dense else "sparse")
        cbs = [timer, Progress(timer, model, enabled=progress, label=run_label)]
        if not cfg.dense:
            cbs = [SparseLoRACallback(), SparsityGuard(model)] + cbs
        cbs += list(callbacks)
        trainer = build_trainer(cfg, path, model, tokenizer, features, args, cbs, counter)
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)

        ckpt = last_checkpoint(output) if resume else None
        if resume:
            say(f"resuming {output} from {ckpt.name}" if ckpt else f"no checkpoint in {output}: starting from step 0")
        start = time.time()
        try:
            result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        except KeyboardInterrupt:
            for cb in cbs:
                if hasattr(cb, "bar") and cb.bar is not None:
                    cb.bar.close()
            saved_at = _save_interrupt_checkpoint(trainer, timer)
            where = f"saved a checkpoint at step {saved_at}" if saved_at is not None else "could not save a checkpoint"
            say(
                f"\ninterrupted: {where} in {output / CHECKPOINTS}. Continue with:\n"
                f"  sparselora finetune --output {output} --resume"
            )
            raise
        wall = time.time() - start
    except BaseException:
        note = None if resume else _abandon(output, aside, created)  # a resumed run keeps what it had
        if note:
            say(note)
        raise
    if aside is not None:  # the new run has steps to show: the old one goes
        shutil.rmtree(aside, ignore_errors=True)

    # outputs: adapter (plain PEFT), optional merged weights, summary, plot
    heldout_loss = _heldout_loss(model, tokenizer, heldout, cfg.batch_size) if heldout else None
    remove_sparselora(model)
    atomic_dir(output / "adapter", lambda p: model.save_pretrained(str(p)))
    if cfg.merge:
        def _merged(p: Path):
            merged = model.merge_and_unload()
            merged.save_pretrained(str(p), safe_serialization=True)
            tokenizer.save_pretrained(str(p))

        atomic_dir(output / "merged", _merged)

    history = trainer.state.log_history
    losses = [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h and "step" in h]
    steps = timer.steps
    measured = steps[1:] if len(steps) > 1 else steps  # the first step pays one-off costs
    sparse_steps = [s for s in measured if s["sparse"]]
    secs = sum(s["seconds"] for s in steps)
    summary = {
        "mode": "dense" if cfg.dense else "sparse",
        "output": str(output),
        "config": cfg.to_dict(),
        "training_path": {**dataclasses.asdict(path), "description": path.describe()},
        "calibration": None if calibration is None else {"dense_loss": calibration.dense_loss,
                                                         "bound": calibration.bound, "rounds": calibration.rounds,
                                                         "within_bound": calibration.within_bound},
        "sparsity_config": sp_cfg.to_dict(),
        "model": {"source": cfg.model, "model_type": arch.model_type, "num_layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_rss_mb(),
        "data": {"path": str(cfg.data), "skipped_lines": len(examples.skipped), **counts,
                 "tokenize": tok_stats.as_dict()},
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "resumed_from": ckpt.name if ckpt else None,
        "wall_seconds": round(wall, 3),
        "train_runtime": result.metrics.get("train_runtime"),
        "steps_timed": len(steps),
        "median_step_seconds": statistics.median([s["seconds"] for s in measured]) if measured else None,
        "median_sparse_step_seconds": statistics.median([s["seconds"] for s in sparse_steps]) if sparse_steps else None,
        "tokens_per_second": sum(s["tokens"] for s in steps) / secs if secs > 0 else None,
        "step_times": steps,
        "flops": analytic_flops(model.config if not hasattr(model, "get_base_model") else
                                model.get_base_model().config, sp_cfg, cfg.batch_size * cfg.grad_accum, counts,
                                cfg.lora_r, cfg.lora_targets, path.fast_kernels),
        "final_loss": losses[-1]["loss"] if losses else None,
        "heldout": None if not heldout else {"examples": len(heldout), "dense_loss": heldout_loss},
        "train_loss": result.training_loss,
        "losses": losses,
        "adapter": str(output / "adapter"),
        "merged": str(output / "merged") if cfg.merge else None,
    }
    atomic_write_json(output / "summary.json", summary)
    try:
        from sparselora.report import plot_losses

        plot_losses(output)
    except ImportError as exc:  # matplotlib missing: the run itself is fine
        say(f"loss.png not written ({exc})")
    return summary


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux/macOS), in MB. On CPU it is mostly the activations a
    step keeps for its backward (about 30 tensors of batch x length x hidden per decoder layer, plus the logits over
    the vocabulary): --gradient-checkpointing and --fast-kernels (labelled-only LM head) cut it."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover
        return None
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _merge_for_resume(saved: dict[str, Any], given: RunConfig) -> RunConfig:
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


def _save_interrupt_checkpoint(trainer, timer) -> int | None:
    """Save a full checkpoint at the last completed step, with the RNG state as it was at that step's end."""
    try:
        import torch

        trainer._save_checkpoint(trainer.model, trial=None)
        step = trainer.state.global_step
        if timer.rng is not None:  # interrupted mid-step: the partial step consumed random numbers; undo that
            path = Path(trainer.args.output_dir) / f"checkpoint-{step}" / "rng_state.pth"
            if path.is_file():
                st = torch.load(path, weights_only=False)
                st.update({k: v for k, v in timer.rng.items()})
                torch.save(st, path)
        return step
    except Exception as exc:  # pragma: no cover - best effort; the periodic checkpoints remain
        logger.warning("could not save a checkpoint after the interrupt: %s", exc)
        return None
