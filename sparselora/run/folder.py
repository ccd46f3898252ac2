"""A run's output folder: checked before anything is written (a folder holding a run needs --resume or
--overwrite), the saved `run_config.yaml` read (the one place that reads it), a previous run set aside by
--overwrite and restored if the new one fails before its first checkpoint, folders written atomically, the
newest checkpoint, the interrupt checkpoint, and whether a run has finished."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from sparselora.io import atomic_write_text
from sparselora.run.config import RunError

logger = logging.getLogger(__name__)

RUN_FILES = ("run_config.yaml", "sparsity.yaml", "summary.json", "loss.png", "checkpoints", "adapter", "merged")
CHECKPOINTS = "checkpoints"
RUN_CONFIG = "run_config.yaml"


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


def read_saved_config(output: Path) -> dict[str, Any]:
    """The settings a run saved in ``output``/run_config.yaml (what --resume continues); read here only."""
    cfg = Path(output) / RUN_CONFIG
    if not cfg.is_file():
        raise RunError(f"nothing to resume in {output}: it has no {RUN_CONFIG} (start the run without --resume)")
    try:
        saved = yaml.safe_load(cfg.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RunError(f"{cfg} is not valid YAML ({exc}); start a new run with --overwrite") from None
    if not isinstance(saved, dict):
        raise RunError(f"{cfg} is not a run configuration; start a new run with --overwrite")
    return saved


def write_run_config(output: Path, config: dict[str, Any]) -> None:
    atomic_write_text(Path(output) / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))


def check_output(output: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the output folder without changing it; returns the saved run config dict when resuming."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if output.exists() and not output.is_dir():
        raise RunError(f"output {output} exists and is not a folder")
    if resume:
        return read_saved_config(output)
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


def set_aside(output: Path) -> Path | None:
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


def remove_run_files(output: Path) -> None:
    for n in RUN_FILES:
        p = output / n
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def abandon(output: Path, aside: Path | None, created: bool) -> str | None:
    """After a failed start: undo what this run wrote unless it has a checkpoint to resume from, and put a
    previous run that --overwrite moved aside back. Returns a note for the user (or None)."""
    if last_checkpoint(output) is not None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
            return "the previous run was replaced by this one (continue it with --resume)"
        return None
    remove_run_files(output)
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


def save_interrupt_checkpoint(trainer, timer) -> int | None:
    """Save a full checkpoint at the last completed step, with the RNG state as it was at that step's end."""
    try:
        import torch

        from sparselora.callback import checkpoint_dir, save_running_scores
        from sparselora.run.callbacks import running_scores

        trainer._save_checkpoint(trainer.model, trial=None)
        step = trainer.state.global_step
        checkpoint = checkpoint_dir(trainer.args.output_dir, step)
        if timer.rng is not None:  # interrupted mid-step: the partial step consumed random numbers; undo that
            path = checkpoint / "rng_state.pth"
            if path.is_file():
                st = torch.load(path, weights_only=False)
                st.update({k: v for k, v in timer.rng.items()})
                torch.save(st, path)
        # the running FFN scores as at the step's end: mid-step a forward may already have averaged its batch in
        scores = timer.scores if timer.rng is not None else running_scores(trainer.model)
        if scores:
            save_running_scores(checkpoint, scores)
        return step
    except Exception as exc:  # pragma: no cover - best effort; the periodic checkpoints remain
        logger.warning("could not save a checkpoint after the interrupt: %s", exc)
        return None
