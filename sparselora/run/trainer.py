"""The Trainer of a run: the learning-rate schedule (a warm-up whose first step trains), the Trainer class
(`transformers.Trainer` or `CUDAGraphTrainer`, counting each trained batch's tokens) and its collator, chosen
after the run's `TrainingPath`."""

from __future__ import annotations

from typing import Callable

from sparselora.run.callbacks import TokenCounter
from sparselora.run.config import RunConfig, RunError


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




def run_trainer_class(base):
    """``base`` (a transformers.Trainer class) plus what `finetune` needs of it: the tokens of each trained batch
    are counted (``token_counter``), and the warm-up's first step trains (`make_scheduler`)."""

    class RunTrainer(base):
        token_counter: TokenCounter | None = None
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


def build_trainer(cfg: RunConfig, path, model, tokenizer, features, args, callbacks, counter: TokenCounter):
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
    trainer = run_trainer_class(base)(model=model, args=args, train_dataset=ListDataset(data),
                                      data_collator=collator, callbacks=list(callbacks))
    trainer.token_counter, trainer.warmup = counter, cfg.warmup
    return trainer


class ListDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


