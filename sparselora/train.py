"""The fine-tuning recipe behind `sparselora finetune` and `sparselora demo`.

    from sparselora.train import RunConfig, finetune
    summary = finetune(RunConfig(model="smollm2-135m", data="train.jsonl", output="runs/sparse", max_steps=50))

One code path for both baselines: a PEFT LoRA model trained by `transformers.Trainer`; with sparsity on,
`apply_sparselora` + `SparseLoRACallback`, with ``dense=True`` the plain PEFT model. `finetune` runs named phases
(check the folder, load, tokenize, choose the training path, apply + calibrate, build the trainer, train, write
the outputs); their pieces live in `sparselora.run` (config, folder, callbacks, trainer). The output folder holds

    run_config.yaml   the resolved run configuration (what --resume continues)
    sparsity.yaml     the SparseLoRA configuration (also written for dense runs: what the FLOPs compare with)
    checkpoints/      Trainer checkpoints (adapter, optimizer, scheduler, RNG, trainer state)
    adapter/          the LoRA adapter in plain PEFT format (PeftModel.from_pretrained, no sparselora needed)
    merged/           base + adapter merged (with merge=True)
    summary.json      config, versions, steps, wall time, tokens/s, analytic FLOPs, losses
    loss.png          the loss curve, overlaid with sibling runs of the same data (dense vs sparse)

Every file is written atomically; folders are written to a temporary sibling and renamed. This module also holds
this machine's settings every command shares (the CPU thread rule, returning freed memory, versions).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from sparselora import SparseLoRACallback, apply_sparselora, remove_sparselora, set_enabled, use_packed_attention
from sparselora.calibrate import calibrate, frozen_loss
from sparselora.data import DataCollator, load_examples, tokenize_examples
from sparselora.fastpath import choose_path, flop_cut_warning, paying_config, small_model_warning
from sparselora.flop_count import flops
from sparselora.loading import load_model
from sparselora.io import atomic_write_json
from sparselora.models.registry import arch_info, causal_lm, module_name
from sparselora.run.callbacks import TokenCounter, callbacks as _callbacks
from sparselora.run.config import (  # noqa: F401  (the public names of sparselora.train)
    MACHINE_FIELDS, PATH_FIELDS, TARGET_NAMES, RunConfig, RunError, merge_for_resume, read_yaml_config,
    resolve_dtype, resolve_paths, sparsity_config,
)
from sparselora.run.folder import (  # noqa: F401
    ASIDE_PREFIX, CHECKPOINTS, RUN_FILES, abandon, atomic_dir, check_output, finished_summary, is_run_dir,
    last_checkpoint, save_interrupt_checkpoint, set_aside, write_run_config,
)
from sparselora.run.trainer import (  # noqa: F401
    build_trainer, check_scheduler, lr_factor_with_warmup, make_scheduler, run_trainer_class, warmup_steps,
)
from sparselora.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)
_TokenCounter = TokenCounter  # the name tests and older callers use


# ------------------------------------------------------------------------------------------- this machine


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("sparselora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    try:
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
    n = threads if threads else default_threads()
    torch.set_num_threads(n)
    return n


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


# ------------------------------------------------------------------------------------------- helpers


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
    T = max(1, round(counts["mean_tokens"]))
    L = min(T, round(counts["mean_labelled"]))
    f = flops(model_config, sp_cfg, (batch_size, T), L, lora_rank=lora_r, lora_targets=tuple(targets),
              labelled_only_head=labelled_only_head)
    return {"batch_shape": [batch_size, T], "labelled_per_row": L, **f, "speedup": f["dense"] / f["sparse"]}


# ------------------------------------------------------------------------------------------- schedule


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


def _padded_batches(model, tokenizer, features, batch_size: int) -> list[dict]:
    """``features`` as padded batches of ``batch_size`` on the model's device (the probe and the held-out loss)."""
    device = next(model.parameters()).device
    collate = DataCollator(tokenizer)
    return [{k: v.to(device) for k, v in collate(features[i:i + batch_size]).items()}
            for i in range(0, len(features), batch_size)]


def _calibrate(model, tokenizer, features, cfg: RunConfig, use_cpu: bool):
    """The sparsity probe (sparselora.calibrate) on the run's first batches, padded, on the training device."""
    if not use_cpu:
        model.to("cuda")
    n = cfg.batch_size
    batches = _padded_batches(model, tokenizer, features[:n * max(1, min(PROBE_BATCHES, len(features) // n))], n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its lines say it, including the warning
        bound = cfg.kl_bound if cfg.probe == "kl" else cfg.loss_bound
        return calibrate(model, batches, bound=bound, criterion=cfg.probe)


def _heldout_loss(model, tokenizer, features, batch_size: int) -> float:
    """The trained adapter's loss on held-out examples, evaluated dense (padded batches, SDPA): the fair comparison
    of a sparse and a dense run, since a sparse run's training loss includes the sparse forward's approximation."""
    causal_lm(model).set_attn_implementation("sdpa")  # packed attention needs packed batches
    return frozen_loss(model, _padded_batches(model, tokenizer, features, batch_size), sparse=False)


# ------------------------------------------------------------------------------------------- the recipe


@dataclass
class _Loaded:
    """What the load and tokenize phases give the rest of the run."""
    model: Any
    tokenizer: Any
    arch: Any
    sp_cfg: Any
    dtype: Any
    features: list
    heldout: list
    counts: dict
    tok_stats: Any
    skipped_lines: int
    flops: dict | None = None  # analytic FLOPs of a step with the config that runs (set once it is final)


def _check_folder(cfg: RunConfig, resume: bool, overwrite: bool, say) -> tuple[RunConfig, dict | None]:
    """Phase 1: the settings resolved (with --resume: the saved ones) and the output folder checked, nothing
    written. Returns the run's config and, for a finished run, its summary."""
    if not cfg.output or (not resume and (not cfg.model or not cfg.data)):
        raise RunError("model, data and output are required")
    cfg = resolve_paths(cfg)
    output = Path(cfg.output)
    saved = check_output(output, resume, overwrite)
    if saved is not None:
        cfg = merge_for_resume(saved, cfg)
        if not cfg.model or not cfg.data:
            raise RunError("model, data and output are required")
        done = finished_summary(output)
        if done is not None:
            say(f"{output} already finished ({done['steps']} of {done['max_steps']} steps): nothing to do. Start "
                "a longer run in a new folder, or replace this one with --overwrite.")
            return cfg, dict(done, already_finished=True)
    check_scheduler(cfg.lr_scheduler)
    return cfg, None


def _load(cfg: RunConfig, use_cpu: bool, say) -> _Loaded:
    """Phases 2 and 3: data and model loaded, the model's family checked, the sparsity config read, the examples
    tokenized and the held-out ones kept apart."""
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
    return _Loaded(model, tokenizer, arch, sp_cfg, dtype, features, heldout, token_counts(features), tok_stats,
                   len(examples.skipped))


def _choose_path(cfg: RunConfig, run: _Loaded, use_cpu: bool, say):
    """Phase 4: the training path for this machine (packing, CUDA graphs, fused kernels), printed with reasons."""
    try:
        path = choose_path("cpu" if use_cpu else "cuda", [len(f["input_ids"]) for f in run.features],
                           cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing,
                           world_size=int(os.environ.get("WORLD_SIZE", "1")), dtype=str(run.dtype).split(".")[-1],
                           packing=cfg.packing, cuda_graphs=cfg.cuda_graphs, fast_kernels=cfg.fast_kernels)
    except ValueError as exc:
        raise RunError(str(exc)) from exc
    say(path.describe())
    return path


def _base_config(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _apply(cfg: RunConfig, run: _Loaded, path, use_cpu: bool, say):
    """Phase 5: LoRA, then SparseLoRA (switched off for the dense baseline), the sparsity probe, the FLOP-cut
    check, packed attention. Sets ``run.model`` and ``run.sp_cfg``; returns the probe's result (or None)."""
    torch.manual_seed(cfg.seed)
    model = run.model
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=[module_name(t) for t in cfg.lora_targets], task_type="CAUSAL_LM",
    )
    model = run.model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    estimator_dir = Path(cfg.estimator_dir).expanduser() if cfg.estimator_dir else None
    if not cfg.dense:
        run.sp_cfg, line = paying_config(run.sp_cfg)
        if line:
            say(line)
    # the dense baseline runs the same patched model with the sparse path switched off. The estimator's small
    # float64 eigendecompositions run single-threaded: on a busy CPU, multi-threaded LAPACK is up to 100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        apply_sparselora(model, run.sp_cfg, estimator_dir=estimator_dir, fast_kernels=path.fast_kernels)
    finally:
        torch.set_num_threads(threads)
    if cfg.dense:
        set_enabled(model, False)
    calibration = None
    if not cfg.dense and cfg.loss_bound is not None and run.sp_cfg.is_sparse:
        calibration = _calibrate(model, run.tokenizer, run.features, cfg, use_cpu)
        run.sp_cfg = calibration.config
        for line in calibration.lines():
            say(line)
    run.flops = analytic_flops(_base_config(model), run.sp_cfg, cfg.batch_size * cfg.grad_accum, run.counts,
                               cfg.lora_r, cfg.lora_targets, path.fast_kernels)
    if not cfg.dense:
        cut = run.flops["speedup"]
        warning = flop_cut_warning(cut)
        say(f"warning: {warning}" if warning else f"analytic FLOP cut of the sparsity config: {cut:.2f}x")
        small = small_model_warning(_base_config(model).hidden_size, "cpu" if use_cpu else "cuda")
        if small:
            say(f"warning: {small}")
    if path.packed:
        use_packed_attention(model)
    return calibration


# Each log reads the loss back from the GPU (a host sync): logging every step there leaves the GPU idle while the
# host prepares the next step. On CPU a log costs nothing and every step's loss is shown.
GPU_LOGGING_STEPS = 10


def _training_arguments(cfg: RunConfig, output: Path, path, dtype, use_cpu: bool):
    """Phase 6a: the Trainer's arguments."""
    return TrainingArguments(
        output_dir=str(output / CHECKPOINTS),
        per_device_train_batch_size=1 if path.packed else cfg.batch_size,  # a packed row holds ~batch_size examples
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=0,  # the warm-up is make_scheduler's (cfg.warmup), whose first step trains
        weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps or (1 if use_cpu else GPU_LOGGING_STEPS),
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


def _build_trainer(cfg: RunConfig, run: _Loaded, path, args, extra: Sequence[Any], progress: bool,
                   label: str | None):
    """Phase 6b: the callbacks and the Trainer. Returns (trainer, timer, callbacks)."""
    StepTimer, SparsityGuard, Progress = _callbacks()
    counter = TokenCounter()
    timer = StepTimer(counter, run.model)
    run_label = label or ("dense" if cfg.dense else "sparse")
    cbs = [timer, Progress(timer, run.model, enabled=progress, label=run_label)]
    if not cfg.dense:
        cbs = [SparseLoRACallback(), SparsityGuard(run.model)] + cbs
    cbs += list(extra)
    trainer = build_trainer(cfg, path, run.model, run.tokenizer, run.features, args, cbs, counter)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer, timer, cbs


def _train(trainer, timer, cbs, output: Path, resume: bool, say):
    """Phase 7: train (from the last checkpoint when resuming). Ctrl-C saves a checkpoint, says how to resume and
    re-raises. Returns (result, wall seconds, the checkpoint resumed from)."""
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
        saved_at = save_interrupt_checkpoint(trainer, timer)
        where = f"saved a checkpoint at step {saved_at}" if saved_at is not None else "could not save a checkpoint"
        say(
            f"\ninterrupted: {where} in {output / CHECKPOINTS}. Continue with:\n"
            f"  sparselora finetune --output {output} --resume"
        )
        raise
    return result, time.time() - start, ckpt


def _write_outputs(cfg: RunConfig, run: _Loaded, path, calibration, trainer, timer, result, wall: float, ckpt,
                   say) -> dict[str, Any]:
    """Phase 8: the held-out loss, adapter (plain PEFT), optional merged weights, summary.json, loss.png."""
    output, model, tokenizer, sp_cfg, counts = Path(cfg.output), run.model, run.tokenizer, run.sp_cfg, run.counts
    heldout = run.heldout
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
    arch = run.arch
    summary = {
        "mode": "dense" if cfg.dense else "sparse",
        "output": str(output),
        "config": cfg.to_dict(),
        "training_path": {**dataclasses.asdict(path), "description": path.describe()},
        "calibration": None if calibration is None else {"dense_loss": calibration.dense_loss,
                                                         "bound": calibration.bound, "rounds": calibration.rounds,
                                                         "criterion": calibration.criterion,
                                                         "within_bound": calibration.within_bound,
                                                         "spread_rows": None if calibration.rows is None else {
                                                             "rows": calibration.rows.config.ffn_sample_rows,
                                                             "mass": calibration.rows.mass,
                                                             "check": calibration.rows_check,
                                                             "kept": calibration.rows_kept}},
        "sparsity_config": sp_cfg.to_dict(),
        "model": {"source": cfg.model, "model_type": arch.model_type, "num_layers": arch.num_layers,
                  "hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_rss_mb(),
        "data": {"path": str(cfg.data), "skipped_lines": run.skipped_lines, **counts,
                 "tokenize": run.tok_stats.as_dict()},
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
        "flops": run.flops,
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
    (same schedule and data order; model and data may be left out, they are saved); a finished run is left as it
    is (its summary is returned). ``overwrite=True`` replaces a previous run, but only once the new one has
    started: until then (and if the new one fails before its first checkpoint) the old one is kept. Nothing is
    written before every setting has been checked and the model and data have loaded. ``callbacks`` are extra
    `TrainerCallback`s. A KeyboardInterrupt saves a checkpoint and re-raises after printing how to resume.
    """
    say = echo or (lambda s: print(s, file=sys.stderr))
    cfg, done = _check_folder(cfg, resume, overwrite, say)
    if done is not None:
        return done


    set_threads(cfg.threads)
    return_freed_memory()
    use_cpu = not torch.cuda.is_available()
    output = Path(cfg.output)
    run = _load(cfg, use_cpu, say)
    path = _choose_path(cfg, run, use_cpu, say)
    calibration = _apply(cfg, run, path, use_cpu, say)
    args = _training_arguments(cfg, output, path, run.dtype, use_cpu)

    # everything is checked and loaded: the run starts, and only now is the output folder changed
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    aside = set_aside(output) if overwrite else None
    try:
        write_run_config(output, cfg.to_dict())
        run.sp_cfg.to_yaml(output / "sparsity.yaml")
        trainer, timer, cbs = _build_trainer(cfg, run, path, args, callbacks, progress, label)
        result, wall, ckpt = _train(trainer, timer, cbs, output, resume, say)
    except BaseException:
        note = None if resume else abandon(output, aside, created)  # a resumed run keeps what it had
        if note:
            say(note)
        raise
    if aside is not None:  # the new run has steps to show: the old one goes
        shutil.rmtree(aside, ignore_errors=True)
    return _write_outputs(cfg, run, path, calibration, trainer, timer, result, wall, ckpt, say)
