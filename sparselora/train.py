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

from sparselora.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

RUN_FILES = ("run_config.yaml", "sparsity.yaml", "summary.json", "loss.png", "checkpoints", "adapter", "merged")
TARGET_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
CHECKPOINTS = "checkpoints"


class RunError(ValueError):
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
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    learning_rate: float = 3e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.04  # a fraction of the steps if < 1, else a step count
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = -1  # > 0 overrides epochs
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
    merge: bool = False
    estimator_dir: str | None = "~/.cache/sparselora/estimators"
    cache_dir: str | None = None  # converted-model cache (default: $SPARSELORA_CACHE or ~/.cache/sparselora/models)
    threads: int = 0  # torch CPU threads (0: torch's default)
    fast_kernels: bool = False  # fused RMSNorm/SiLU*up and a labelled-only LM head (dense and sparse runs alike)
    cuda_graphs: bool = False  # forward + backward replayed from CUDA graphs (sparselora.CUDAGraphTrainer)

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
                raise RunError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool):
            raise RunError(f"max_steps must be an integer, got {self.max_steps!r}")
        if self.max_steps <= 0 and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise RunError("give max_steps > 0 or epochs > 0")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RunError(f"dtype {self.dtype!r} unknown; choose auto, float32, bfloat16 or float16")
        if not 0 <= self.lora_dropout < 1:
            raise RunError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise RunError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.cuda_graphs and (self.gradient_checkpointing or self.lora_dropout > 0 or self.dtype == "float16"):
            raise RunError("cuda_graphs needs lora_dropout 0, no gradient checkpointing and bfloat16/float32; "
                           "turn cuda_graphs off or change those")

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
    """A SparseLoRAConfig from a preset name, a YAML file, or None (the `scaled` preset for this depth)."""
    from sparselora.config import SparseLoRAConfig

    if spec is None or spec == "scaled":
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


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def prepare_output(output: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the output folder; returns the saved run config dict when resuming."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise RunError(f"output {output} exists and is not a folder")
    if resume:
        cfg = output / "run_config.yaml"
        if not cfg.is_file():
            raise RunError(f"nothing to resume in {output}: it has no run_config.yaml (start the run without --resume)")
        return yaml.safe_load(cfg.read_text())
    if output.is_dir() and any(output.iterdir()):
        if not is_run_dir(output):
            raise RunError(
                f"output folder {output} is not empty and holds no sparselora run; choose a new or empty folder"
            )
        if not overwrite:
            raise RunError(
                f"output folder {output} already holds a run; pass --resume to continue it or --overwrite to "
                "replace it"
            )
        for name in RUN_FILES:
            p = output / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def token_counts(features: Sequence[dict]) -> dict[str, float]:
    """Average sequence length, labelled and context tokens per example."""
    lens = [len(f["input_ids"]) for f in features]
    lab = [sum(1 for v in f["labels"] if v != -100) for f in features]
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
    from sparselora.flops import flops

    T = max(1, round(counts["mean_tokens"]))
    L = min(T, round(counts["mean_labelled"]))
    f = flops(model_config, sp_cfg, (batch_size, T), L, lora_rank=lora_r, lora_targets=tuple(targets),
              labelled_only_head=labelled_only_head)
    return {"batch_shape": [batch_size, T], "labelled_per_row": L, **f, "speedup": f["dense"] / f["sparse"]}


# ------------------------------------------------------------------------------------------- callbacks


class _TokenCounter:
    """Wraps a collator and counts the real (attention_mask == 1) tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


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

        def on_train_begin(self, args, state, control, **kw):
            self._tok0 = self.counter.tokens

        def on_step_begin(self, args, state, control, **kw):
            self.rng = _rng_state()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is None:
                return
            from sparselora.patch import get_state

            st = get_state(self.model, required=False)
            self.steps.append(
                {
                    "step": state.global_step,
                    "seconds": time.perf_counter() - self._t0,
                    "tokens": self.counter.tokens - self._tok0,
                    "sparse": bool(st is not None and st.active),
                }
            )
            # the Trainer fetches a step's batches before on_step_begin: count tokens from step end to step end
            self._tok0 = self.counter.tokens
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
        """One progress bar: loss, learning rate, tokens/s, current sparsity, ETA."""

        def __init__(self, timer: StepTimer, model, enabled: bool = True, label: str = "train"):
            self.timer, self.model, self.enabled, self.label = timer, model, enabled, label
            self.bar = None
            self.last: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kw):
            if not self.enabled:
                return
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
                self.on_step_end(args, state, control)  # show the step's loss now, not one step later

        def on_step_end(self, args, state, control, **kw):
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
    (same schedule and data order). ``callbacks`` are extra `TrainerCallback`s. A KeyboardInterrupt saves a
    checkpoint and re-raises after printing how to resume.
    """
    say = echo or (lambda s: print(s, file=sys.stderr))
    if not cfg.model or not cfg.data or not cfg.output:
        raise RunError("model, data and output are required")
    output = Path(cfg.output).expanduser()
    saved = prepare_output(output, resume, overwrite)
    if saved is not None:
        cfg = _merge_for_resume(saved, cfg)

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from sparselora import SparseLoRACallback, apply_sparselora, remove_sparselora, set_enabled
    from sparselora.data import DataCollator, load_examples, tokenize_examples
    from sparselora.models import load_model
    from sparselora.models.registry import arch_info

    dtype = resolve_dtype(cfg.dtype)
    examples = load_examples(cfg.data, fmt=cfg.data_format, skip_bad_lines=cfg.skip_bad_lines, limit=cfg.limit)
    if examples.skipped:
        say(f"skipped {len(examples.skipped)} bad line(s) of {cfg.data} (first: line {examples.skipped[0][0]}: "
            f"{examples.skipped[0][1]})")
    model, tokenizer = load_model(cfg.model, dtype=dtype, cache_dir=cfg.cache_dir)
    arch = arch_info(model.config)  # a clear error for unsupported families before any work
    features, tok_stats = tokenize_examples(examples, tokenizer, max_length=cfg.max_length)
    counts = token_counts(features)
    sp_cfg = sparsity_config(cfg.sparsity, arch.num_layers)

    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "run_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    sp_cfg.to_yaml(output / "sparsity.yaml")

    torch.manual_seed(cfg.seed)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=[f"{t}_proj" for t in cfg.lora_targets], task_type="CAUSAL_LM",
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
        apply_sparselora(model, sp_cfg, estimator_dir=estimator_dir, fast_kernels=cfg.fast_kernels)
    finally:
        torch.set_num_threads(threads)
    if cfg.dense:
        set_enabled(model, False)

    counter = _TokenCounter(DataCollator(tokenizer))
    StepTimer, SparsityGuard, Progress = _callbacks()
    timer = StepTimer(counter, model)
    run_label = label or ("dense" if cfg.dense else "sparse")
    cbs = [timer, Progress(timer, model, enabled=progress, label=run_label)]
    if not cfg.dense:
        cbs = [SparseLoRACallback(), SparsityGuard(model)] + cbs
    cbs += list(callbacks)
    use_cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
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
    trainer_cls = Trainer
    if cfg.cuda_graphs:
        from sparselora.trainer import CUDAGraphTrainer as trainer_cls
    trainer = trainer_cls(model=model, args=args, train_dataset=_ListDataset(features), data_collator=counter,
                          callbacks=cbs)
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

    # outputs: adapter (plain PEFT), optional merged weights, summary, plot
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
        "sparsity_config": sp_cfg.to_dict(),
        "model": {"source": cfg.model, "model_type": arch.model_type, "num_layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size},
        "versions": versions(),
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
                                cfg.lora_r, cfg.lora_targets, cfg.fast_kernels),
        "final_loss": losses[-1]["loss"] if losses else None,
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


def _merge_for_resume(saved: dict[str, Any], given: RunConfig) -> RunConfig:
    """The saved configuration; a setting given now that differs from it is an error (it would change the run)."""
    base = RunConfig.from_dict(saved, source="saved run_config.yaml")
    defaults = RunConfig()
    diffs = []
    for f in dataclasses.fields(RunConfig):
        if f.name in ("output",):
            continue
        new, old, dflt = getattr(given, f.name), getattr(base, f.name), getattr(defaults, f.name)
        if new is not None and new != dflt and new != old:
            diffs.append(f"{f.name}: saved {old!r}, given {new!r}")
    if diffs:
        raise RunError(
            "--resume continues the saved run with its own settings; these differ: " + "; ".join(diffs)
            + ". Drop them, or start a new run in another folder."
        )
    base.output = given.output
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
