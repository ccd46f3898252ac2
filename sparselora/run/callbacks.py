"""The Trainer callbacks of a run: `StepTimer` (time, tokens and sparsity of each optimizer step; the RNG
and the running FFN scores at each step's start, for the interrupt checkpoint), `SparsityGuard` (sparsity on
but a forward got no labels), `Progress` (one progress bar), and `TokenCounter` (the real tokens of the batches
trained on)."""

from __future__ import annotations

import logging
import random
import sys
from typing import Any

from sparselora.graphs import COUNTS_KEY
from sparselora.tokens import IGNORE_INDEX

logger = logging.getLogger(__name__)


class TokenCounter:
    """Real (attention_mask == 1) tokens of the batches the trainer has trained on (not those it prefetched)."""

    def __init__(self):
        self.tokens = 0
        self.unlabelled_batches = 0

    def add(self, inputs) -> None:
        counts = inputs.get(COUNTS_KEY)  # counted on the host by the graph trainer's collator: no device sync
        mask, ids, labels = inputs.get("attention_mask"), inputs.get("input_ids"), inputs.get("labels")
        if counts is not None:
            self.tokens += counts.real_tokens
            unlabelled = counts.head_rows == 0
        else:
            self.tokens += int(mask.sum()) if mask is not None else int(ids.numel()) if ids is not None else 0
            unlabelled = labels is not None and not bool((labels[..., 1:] != IGNORE_INDEX).any())
        if unlabelled:
            self.unlabelled_batches += 1
            if self.unlabelled_batches == 1:
                logger.warning(
                    "sparselora: a batch has no labelled token (every label is -100, e.g. prompts longer than "
                    "--max-length or empty targets): its loss is 0/0 = NaN and it teaches nothing. Check the data's "
                    "targets and --max-length."
                )


def running_scores(model) -> dict | None:
    """The model's running FFN scores (`SparseLoRAState.running_scores_state`), None without any."""
    from sparselora.patch import get_state

    st = get_state(model, required=False)
    return st.running_scores_state() if st is not None and st.running_scores else None


def callbacks():
    """Trainer callbacks, built lazily (transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time and tokens of each optimizer step, from its begin to the next step's (the last one's to the end of
        training: data loading, logging and checkpoints count; on a GPU by CUDA events, `bench.timing.Clock`: between
        the Trainer's logs nothing syncs and the host clock would miss the waits); whether sparsity was on; RNG at each
        step start. ``steps``: the steps whose time is known so far (all of them once training has ended)."""

        def __init__(self, counter: TokenCounter, model):
            self.counter, self.model = counter, model
            self._records: list[dict[str, float]] = []
            self._clock = None  # a bench.timing.Clock, on the model's device once training starts
            self._tok0 = 0
            self.rng = None
            self.scores = None  # the running FFN scores at the current step's start (None between steps)

        @property
        def steps(self) -> list[dict[str, float]]:
            if self._clock is None:
                return []
            secs = self._clock.seconds()
            for rec, t in zip(self._records, secs):
                rec["seconds"] = t
            return self._records[: len(secs)]

        def on_step_begin(self, args, state, control, **kw):
            if self._clock is None:
                from sparselora.bench.timing import Clock

                self._clock = Clock(next(self.model.parameters()).device)
            self._clock.mark()
            self.rng = rng_state()
            self.scores = running_scores(self.model)  # as at the last step's end, like the RNG
            self._tok0 = self.counter.tokens

        def on_step_end(self, args, state, control, **kw):
            if self._clock is None:
                return
            from sparselora.patch import get_state

            st = get_state(self.model, required=False)
            self._records.append(
                {
                    "step": state.global_step,
                    "seconds": None,  # known when the next step begins
                    "tokens": self.counter.tokens - self._tok0,  # counted in training_step: this step's batches
                    "sparse": bool(st is not None and st.active),
                }
            )
            self.rng = self.scores = None

        def on_train_end(self, args, state, control, **kw):
            if self._clock is not None and len(self._clock.marks) == len(self._records):
                self._clock.mark()  # the end of the last step
                self._clock.seconds(wait=True)

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


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.random.get_rng_state()  # the Trainer's non-distributed format
    return st
