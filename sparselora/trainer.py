"""transformers.Trainer whose training step runs forward + backward through `CUDAGraphStep`.

The Trainer keeps everything else (optimizer, schedule, clipping, logging, checkpoints, resume); only the
forward + backward of each micro-batch is replayed from a CUDA graph. Use with `SparseLoRACallback` as usual:

    trainer = CUDAGraphTrainer(model=model, args=args, ..., callbacks=[SparseLoRACallback()])

Under gradient accumulation every micro-batch's mean loss weighs the same (the graph cannot take the Trainer's
per-step token count), like the Trainer without ``num_items_in_batch``. Single process, bf16 or fp32 only. On a
machine without CUDA the same path runs eagerly (for tests and CPU runs).
"""

from __future__ import annotations

import logging

import torch
from transformers import Trainer

from sparselora.graphs import BATCH_KEYS, COUNTS_KEY, CUDAGraphStep, batch_counts
from sparselora.patch import get_state

logger = logging.getLogger("sparselora")


class HostCounts:
    """Collator wrapper: adds the batch's `batch_counts`, computed on its CPU tensors before the batch moves to the
    GPU, so that the graphed step learns its shapes without waiting for the device (with non-blocking copies of
    pinned batches the host then prepares the next step while the GPU runs this one)."""

    def __init__(self, collator, dense_output_tokens: bool):
        self.collator, self.dense_output_tokens = collator, dense_output_tokens

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch.get("labels")
        if torch.is_tensor(labels) and labels.device.type == "cpu":
            batch[COUNTS_KEY] = batch_counts(labels, batch.get("attention_mask"), self.dense_output_tokens)
        return batch


class CUDAGraphTrainingMixin:
    """Mix into any transformers.Trainer subclass (TRL's SFTTrainer included) before it.

    ``graph_bucket``: token-count bucket of `CUDAGraphStep` (None: automatic; 1: exact counts, one graph per
    distinct count). Batch real data with `sparselora.data.PackedCollator` so that a few graphs serve the run.
    """

    def __init__(self, *args, graph_bucket: int | None = None, **kwargs):
        self._graph_bucket = graph_bucket
        super().__init__(*args, **kwargs)
        get_state(self.model).graphed = True  # SparseLoRACallback: no eager-GPU warning
        if self.data_collator is not None and not isinstance(self.data_collator, HostCounts):
            self.data_collator = HostCounts(self.data_collator, get_state(self.model).config.dense_output_tokens)
        if torch.cuda.is_available():
            if self.args.dataloader_pin_memory:  # pinned batches copied without a stream sync
                self.accelerator.dataloader_config.non_blocking = True
            if self.args.logging_nan_inf_filter:
                # the filter reads every step's loss on the host: a sync per step that idles the GPU while the host
                # prepares the next one. Without it a non-finite loss shows in the logged mean instead of being dropped.
                logger.warning("sparselora: CUDAGraphTrainer turns logging_nan_inf_filter off (it reads every step's "
                               "loss on the host, which idles the GPU); a non-finite loss shows in the logged mean")
                self.args.logging_nan_inf_filter = False

    def _graph_checks(self) -> None:
        a = self.args
        if a.world_size > 1:
            raise ValueError("CUDAGraphTrainer runs in one process; for DDP/FSDP use the plain Trainer")
        if a.fp16:
            raise ValueError("CUDAGraphTrainer does not support fp16 loss scaling; use bf16=True or fp32")
        if getattr(a, "gradient_checkpointing", False):
            raise ValueError("CUDAGraphTrainer does not capture gradient checkpointing; turn one of them off")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if getattr(self, "_graph_step", None) is None:
            self._graph_checks()
            self._graph_step = CUDAGraphStep(self.model, capture=next(self.model.parameters()).is_cuda,
                                             bucket=self._graph_bucket)
        model.train()
        counts = inputs.pop(COUNTS_KEY, None)
        inputs = self._prepare_inputs(inputs)
        extra = set(inputs) - set(BATCH_KEYS)
        if extra:
            raise ValueError(
                f"CUDAGraphTrainer takes batches of {', '.join(BATCH_KEYS)}; the collator also gave {sorted(extra)}"
            )
        ga = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            loss = self._graph_step(grad_scale=1.0 / ga, counts=counts, **inputs)
        return loss.detach() / ga

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(COUNTS_KEY, None)  # evaluation batches come through the same collator; the model takes no counts
        return super().prediction_step(model, inputs, *args, **kwargs)


class CUDAGraphTrainer(CUDAGraphTrainingMixin, Trainer):
    pass


__all__ = ["CUDAGraphTrainer", "CUDAGraphTrainingMixin", "HostCounts"]
