"""SparseLoRACallback: progressive sparsity and sparsity logging for transformers.Trainer (and TRL trainers).

The schedule is derived from ``state.global_step`` and ``state.max_steps`` at every step, so a resumed run
picks up exactly where the interrupted one was.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from sparselora.patch import get_state, schedule, sparsity_stats

logger = logging.getLogger("sparselora")


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

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        schedule(self._model(model), state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is not None and "loss" in logs:
            stats = sparsity_stats(self._model(model))
            logs.update(stats)
            # the Trainer appended its copy of `logs` to the history before calling us
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)
