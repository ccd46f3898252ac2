"""SparseLoRACallback: progressive sparsity and sparsity logging for transformers.Trainer (and TRL trainers).

The schedule is derived from ``state.global_step`` and ``state.max_steps`` at every step, and the sampled
selector's running FFN scores are saved with every checkpoint (one file per process: DDP ranks see different
batches) and loaded when a run resumes, so a resumed run picks up exactly where the interrupted one was.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from sparselora.io import atomic_write
from sparselora.patch import get_state, schedule, sparsity_stats

logger = logging.getLogger("sparselora")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder the Trainer writes the checkpoint of ``step`` to."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _scores_file(checkpoint: Path) -> Path:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return checkpoint / f"sparselora_running_scores_rank{rank}.safetensors"


def save_running_scores(checkpoint: Path, tensors: dict) -> None:
    """Write a checkpoint's running FFN scores (`SparseLoRAState.running_scores_state`), atomically."""
    if tensors and checkpoint.is_dir():
        from safetensors.torch import save_file

        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(_scores_file(checkpoint), lambda p: save_file(cpu, str(p)))


class SparseLoRACallback(TrainerCallback):
    def __init__(self, model=None):
        self.model = model  # optional; the Trainer passes its model to every event

    def _model(self, model):
        model = self.model if self.model is not None else model
        if model is None:
            raise ValueError("SparseLoRACallback got no model; pass SparseLoRACallback(model)")
        get_state(model)  # a clear error if apply_sparselora was forgotten
        return model

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from sparselora.fastpath import eager_gpu_warning  # fastpath imports the data package, which imports us

        model = self._model(model)
        sl = get_state(model)
        warning = eager_gpu_warning(next(model.parameters()).device.type, sl.graphed, sl.enabled)
        if warning:
            logger.warning("sparselora: %s", warning)
        schedule(model, state.global_step, state.max_steps)
        # resumed after a sparse step: the Trainer loaded checkpoint-<step>, which holds the scores of that step
        if sl.running_scores and state.global_step > sl.config.start_step_for(state.max_steps):
            self._load_scores(model, sl, checkpoint_dir(args.output_dir, state.global_step))

    @staticmethod
    def _load_scores(model, sl, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        path = _scores_file(checkpoint)
        if not path.is_file():
            logger.warning("sparselora: resumed at step %s without the running FFN channel scores (%s not found: "
                           "a checkpoint of an older version, or one saved elsewhere); the averages start afresh",
                           checkpoint.name.split("-")[-1], path)
            return
        sl.load_running_scores(load_file(str(path)), next(model.parameters()).device)

    def on_save(self, args, state, control, model=None, **kwargs):  # at a step's end: the scores are that step's
        save_running_scores(checkpoint_dir(args.output_dir, state.global_step),
                            get_state(self._model(model)).running_scores_state())

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        schedule(self._model(model), state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and "loss" in logs:
            stats = sparsity_stats(self._model(model))
            logs.update(stats)
            # the Trainer appended its copy of `logs` to the history before calling us
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)
