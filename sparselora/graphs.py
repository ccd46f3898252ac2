"""A training step's forward and backward replayed from a CUDA graph.

SparseLoRA's sparse step issues several times the kernels of a dense one (gathers, selection, split
projections), most of them small; on a fast GPU the host cannot launch them as quickly as they run, so the step
is host-bound and the FLOPs saved do not show up as time. A CUDA graph launches the whole forward + backward at
once. Shapes inside the step depend on the batch's shape and token counts, so one graph is captured per
signature and replayed for every batch that matches. To make a handful of signatures serve a whole run of real,
variable-length data, batch it packed (`sparselora.data.PackedCollator`: one shape for every batch) and let the
step round the counts to buckets: the sparse row count down (the last few context tokens run dense, exactly),
the labelled-only head's row count up (extra rows carry no label, so no loss and no gradient). A batch whose
bucket has no graph yet is served by an existing graph with fewer sparse rows and at least its head rows when
that wastes at most ``slack`` context tokens (they run dense) and one head bucket; a capture costs about five
steps, a reused step a few percent of one, so short runs capture once or twice. A bucket served that way
``promote_after`` times gets its own graph (a long run then pays the capture back).

    step = CUDAGraphStep(model)           # after apply_sparselora(model, cfg, fast_kernels=True)
    for batch in loader:
        loss = step(**batch)              # forward + backward; gradients land in p.grad as usual
        opt.step(); opt.zero_grad(set_to_none=True)

The optimizer stays outside the graph (any optimizer works, and the LR schedule needs no care).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from sparselora.models.registry import causal_lm
from sparselora.patch import get_state
from sparselora.tokens import IGNORE_INDEX, TokenSplit, check_labels, split_from_masks, split_masks

TENSOR_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
INT_KEYS = ("max_length_q", "max_length_k")  # packed batches' segment bound: part of the signature
BATCH_KEYS = TENSOR_KEYS + INT_KEYS
COUNTS_KEY = "sparselora_counts"  # `HostCounts`' entry in a batch (a `BatchCounts`: no tensor, it stays on the host)


@dataclass(frozen=True)
class BatchCounts:
    """The host values a graphed step's shapes depend on, and what a run logs of a batch. Not a tuple: the
    Trainer's and accelerate's batch movers pass other objects through untouched."""

    context: int  # context tokens (may run sparse)
    labelled: int  # labelled tokens that stay dense
    head_rows: int  # labelled positions after the first (rows of the labelled-only head)
    all_real: bool  # no padding
    real_tokens: int  # attention_mask == 1


def batch_counts(labels: torch.Tensor, attention_mask: torch.Tensor | None, dense_output_tokens: bool = True,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> BatchCounts:
    """`BatchCounts` of a batch (``masks``: its `split_masks`, when already made). Computed on the collator's CPU
    tensors they cost no device sync (`HostCounts`); `CUDAGraphStep` computes them itself, with one sync, when a
    batch does not bring them."""
    context, labelled = masks or split_masks(labels, attention_mask, tuple(labels.shape), dense_output_tokens)
    real = attention_mask.sum() if attention_mask is not None else labels.new_tensor(labels.numel())
    n_ctx, n_lab, head_rows, n_real = torch.stack([
        context.sum(), labelled.sum(), (labels[:, 1:] != IGNORE_INDEX).sum(), real,
    ]).tolist()
    return BatchCounts(int(n_ctx), int(n_lab), int(head_rows), int(n_real) == labels.numel(), int(n_real))


def auto_bucket(num_tokens: int) -> int:
    """Bucket size for token counts: the power of two nearest below 1/32 of the batch's slots (128 for 4096).
    At most 1/32 of the context runs dense, and a run of packed rows sees a handful of signatures."""
    return 1 << max(0, (num_tokens // 32).bit_length() - 1)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    inputs: dict[str, torch.Tensor]  # static copies the graph reads
    ints: dict[str, int]  # host values of the signature (packed batches' segment bound)
    split: TokenSplit | None  # static order/inverse the graph reads
    loss: torch.Tensor | None  # written by every replay
    grads: list[torch.Tensor | None]  # written by every replay, one per trainable parameter


class CUDAGraphStep:
    """Callable ``step(input_ids=..., labels=..., attention_mask=...) -> loss`` that runs forward + backward of
    ``model`` (a SparseLoRA-patched PEFT model) from a CUDA graph, capturing one per new batch signature.

    Gradient accumulation works (gradients are added to a ``p.grad`` that is already set). LoRA dropout replays
    (its masks come from torch's RNG, whose offsets a graph advances per replay). The model must not change
    between steps other than by in-place parameter updates (the graph holds the tensors it read at capture). ``capture=False`` runs the same path eagerly (what CPU tests check).
    """

    def __init__(self, model: nn.Module, max_graphs: int = 16, warmup: int = 2, capture: bool = True,
                 bucket: int | None = None, slack: int | None = None, promote_after: int = 128):
        self.model, self.state = model, get_state(model)
        self.hf = causal_lm(model)
        if capture and not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphStep needs a CUDA device; use capture=False to run the same path eagerly")
        if max_graphs < 1 or warmup < 1:
            raise ValueError(f"max_graphs and warmup must be >= 1, got {max_graphs} and {warmup}")
        if bucket is not None and bucket < 1:
            raise ValueError(f"bucket must be >= 1 (1: exact counts) or None (automatic), got {bucket}")
        if slack is not None and slack < 0 or promote_after < 1:
            raise ValueError(f"slack must be >= 0 (0: no reuse) or None (automatic: 3 buckets) and promote_after "
                             f">= 1, got {slack} and {promote_after}")
        self.capture, self.max_graphs, self.warmup, self.bucket = capture, max_graphs, warmup, bucket
        self.slack, self.promote_after = slack, promote_after
        self.served: dict[tuple, int] = {}  # exact bucket key -> batches a neighbouring graph served
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (LoRA adapters); nothing to train")
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0
        # Activations, gradients and loss of the largest capture: memory the graphs keep reserved between steps
        # (capturing resets CUDA's peak-memory statistics to measure it).
        self.graph_peak_bytes = 0

    # ------------------------------------------------------------------------------------------ batch signature
    def _prepare(self, batch: dict, counts: BatchCounts | None):
        unknown = set(batch) - set(BATCH_KEYS)
        if unknown or "input_ids" not in batch or "labels" not in batch:
            raise ValueError(
                f"CUDAGraphStep takes {', '.join(BATCH_KEYS)} (input_ids and labels required); got {sorted(batch)}"
            )
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        check_labels(labels, tuple(ids.shape))
        # buckets only bound the number of captures: the eager path (capture=False) keeps exact counts by default
        bucket = self.bucket or (auto_bucket(ids.numel()) if self.capture else 1)
        slack = self.slack if self.slack is not None else (3 * bucket if bucket > 1 else 0)
        active = self.state.active
        context = labelled = None
        if active or counts is None:
            context, labelled = split_masks(labels, mask, tuple(ids.shape), self.state.config.dense_output_tokens)
        if counts is None:  # the step's one host sync: shapes depend on the counts; whether the mask can be dropped
            counts = batch_counts(labels, mask, masks=(context, labelled))
        n_ctx, n_lab, head_rows, all_real = counts.context, counts.labelled, counts.head_rows, counts.all_real
        if not active:
            n_ctx = n_lab = 0
        packed = "cu_seq_lens_q" in batch
        if mask is not None and all_real and not packed:
            mask = None  # no padding: the causal kernel needs no mask (and reads none)
        inputs = {k: v for k, v in batch.items() if k in TENSOR_KEYS and v is not None}
        if mask is None:
            inputs.pop("attention_mask", None)
        ints = tuple((k, int(batch[k])) for k in INT_KEYS if batch.get(k) is not None)
        labelled_sel = active and self.state.config.selector == "labelled"  # its shapes depend on that count too
        base = (tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items())), ints, active,
                n_lab if labelled_sel else None, torch.is_autocast_enabled())
        # extra head rows carry no label; a coarser bucket there (they cost only the head) halves the signatures
        head_bucket = 4 * bucket
        limit = labels[:, 1:].numel()
        n_sparse, head = self._choose(base, n_ctx // bucket * bucket if active else 0,
                                      min(-(-head_rows // head_bucket) * head_bucket, limit), head_rows,
                                      slack, head_bucket, bucket)
        split = split_from_masks(context, labelled, n_sparse, n_lab, tuple(ids.shape)) if n_sparse else None
        return (base, n_sparse, head), inputs, dict(ints), split, head

    def _choose(self, base, n_bucket: int, head_bucketed: int, head_rows: int, slack: int, head_bucket: int,
                bucket: int) -> tuple[int, int]:
        """(sparse rows, head rows) of the graph for a batch: ``n_bucket`` is its context count bucketed down,
        ``head_rows`` its labelled positions (``head_bucketed`` rounded up). Its own bucket's graph if captured;
        else the captured neighbour wasting the fewest sparse rows (within ``slack``, head rows within one head
        bucket); else a new graph, a bucket lower when reuse is on, so that the batches just below fit it too."""
        own = (n_bucket, head_bucketed)
        if (base, *own) in self.graphs or slack == 0:
            return own
        near = [(n, h) for (b, n, h) in self.graphs if b == base and n_bucket - slack <= n <= n_bucket
                and (n > 0) == (n_bucket > 0) and head_rows <= h <= head_bucketed + head_bucket]
        served = self.served.get((base, *own), 0)
        if near and served < self.promote_after:
            self.served[(base, *own)] = served + 1
            return max(near, key=lambda nh: (nh[0], -nh[1]))
        if near or not n_bucket:  # served often enough: its own graph pays the capture back
            return own
        return max(bucket, n_bucket - bucket), head_bucketed

    # ------------------------------------------------------------------------------------------------ running
    def _forward_backward(self, entry: _Graph, head_rows: int) -> torch.Tensor:
        with self.state.pinned(entry.split, head_rows):
            loss = self.model(**entry.inputs, **entry.ints, use_cache=False).loss
            loss.backward()
        return loss.detach()

    def _new_entry(self, inputs, ints, split) -> _Graph:
        static = {k: v.clone() for k, v in inputs.items()}
        sp = None
        if split is not None:
            sp = TokenSplit(split.order.clone(), split.inverse.clone(), split.num_context, split.shape,
                            split.num_labelled)
        return _Graph(None, static, ints, sp, None, [])

    def _capture(self, entry: _Graph, head_rows: int) -> None:
        saved = [p.grad for p in self.params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            # warm-up: lazy inits (the running FFN scores' buffers too), Triton compilation, cuBLAS workspaces
            with torch.cuda.stream(side), self.state.running_scores_kept():
                for _ in range(self.warmup if not self.captures else 1):  # later captures: kernels are built
                    for p in self.params:
                        p.grad = None
                    self._forward_backward(entry, head_rows)
            torch.cuda.current_stream().wait_stream(side)
            for p in self.params:
                p.grad = None
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # what the graph's private memory pool must hold, below
            start = torch.cuda.memory_allocated()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    entry.loss = self._forward_backward(entry, head_rows)
            except Exception as exc:
                raise RuntimeError(
                    f"CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}). Something in "
                    "the step synchronizes with the host; common causes: a padded batch whose mask "
                    "code syncs in this transformers version (pack rows or bucket lengths), a loss that calls "
                    ".item(). Run the step without CUDAGraphStep."
                ) from exc
            entry.graph = graph
            entry.grads = [p.grad for p in self.params]
            self.captures += 1
            self.graph_peak_bytes = max(self.graph_peak_bytes, torch.cuda.max_memory_allocated() - start)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def __call__(self, grad_scale: float = 1.0, counts: BatchCounts | None = None,
                 **batch: torch.Tensor) -> torch.Tensor:
        """Forward + backward of ``batch``; the new gradients, times ``grad_scale`` (1 / accumulation steps under
        gradient accumulation), are added to any ``p.grad`` already set. Returns the (unscaled) loss. ``counts``:
        `batch_counts` of the batch computed on the host before it moved to the GPU (no device sync here then)."""
        key, inputs, ints, split, head_rows = self._prepare(batch, counts)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._new_entry(inputs, ints, split)
            if self.capture:
                self._capture(entry, head_rows)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for k, v in inputs.items():
            entry.inputs[k].copy_(v)
        if split is not None:
            entry.split.order.copy_(split.order)
            entry.split.inverse.copy_(split.inverse)
        # a p.grad that is a graph's own buffer would be overwritten by the replay: keep a copy
        own = {id(g) for e in self.graphs.values() for g in e.grads if g is not None}
        before = [None if p.grad is None else (p.grad.clone() if id(p.grad) in own else p.grad) for p in self.params]
        if self.capture:
            entry.graph.replay()
            loss, new = entry.loss.clone(), entry.grads
        else:
            for p in self.params:
                p.grad = None
            loss = self._forward_backward(entry, head_rows)
            new = [p.grad for p in self.params]
        for p, g, prev in zip(self.params, new, before):
            if g is not None and grad_scale != 1.0:
                g.mul_(grad_scale)
            p.grad = g if prev is None else (prev.add_(g) if g is not None else prev)
        self.state.end_replay(entry.split)
        return loss
