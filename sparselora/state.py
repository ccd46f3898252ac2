"""Per-model SparseLoRA state shared by the layer wrappers: the switch, the schedule and the current batch's
context/output split. It lives on the model instance, never on a class.

The per-batch lifecycle, and who does what:

1. **begin** — the causal LM's forward pre-hook (`patch.apply_sparselora`) calls `begin_batch(labels,
   attention_mask, shape)` at every forward. It commits the last forward's running FFN scores
   (`selection.RunningScore`: not in a recompute, which runs no causal-LM forward), validates the labels' shape
   (`tokens.check_labels`, the one check), then sets `split`: None without labels or while the path is off
   (`active` False), else the batch's `TokenSplit` (`tokens.split_tokens`, one host sync), or, inside `pinned`,
   the pinned split as is.
2. **use** — each `SparseMLP` / `SparseAttention` of a sparse layer reads `split` (if `active`) during the
   forward and picks its channels from the context rows; `None` means the layer runs dense. `stream_permuted`
   (set with `split`) says whether the runs of attention-sparse layers see the residual stream context-first
   (`modules.stream.PermutedStream`).
3. **keep** — `split` stays until the next forward's `begin_batch`, so gradient checkpointing recomputes the
   layers with the same split in backward, and `kept_channels` / `sparsity_stats` describe the last batch.
4. **pin** (CUDA graphs only) — `CUDAGraphStep` runs forward + backward inside ``with state.pinned(split,
   head_rows):``: the split was computed (and bucketed) before capture, so the captured forward does no host
   sync; `head_rows` is the labelled-only head's row count (`modules.fast.LabelledOnlyHead`). Both are
   cleared when the block exits. After a replay (no Python forward ran) the step calls `end_replay(split)` so
   that step 3 holds for graphs too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from sparselora.config import SparseLoRAConfig
from sparselora.estimator import Estimator
from sparselora.models.registry import ArchInfo
from sparselora.selection import SELECTORS, commit_running
from sparselora.tokens import TokenSplit, check_labels, split_tokens

STATE_ATTR = "_sparselora_state"


@dataclass(frozen=True)
class Pinned:
    """What `CUDAGraphStep` fixes for one captured/replayed forward: the split (None: dense) and head rows."""

    split: TokenSplit | None
    head_rows: int | None


class SparseLoRAState:
    def __init__(self, config: SparseLoRAConfig, arch: ArchInfo, estimator: Estimator | None):
        self.config = config
        self.arch = arch
        self.estimator = estimator
        self.enabled = True
        self.scheduled_on = config.start_step == 0
        self.split: TokenSplit | None = None  # the current batch's split (see the lifecycle above)
        self._pinned: Pinned | None = None
        # ((batch, seq), flat row indices) of the rows the labelled-only head reads, set by it at every forward
        # (None: every row) and kept like `split`; the last layer's dense FFN computes only these (modules.fast)
        self.head_rows_index: tuple[tuple[int, int], torch.Tensor] | None = None
        # whether this forward's residual stream runs permuted context-first through the runs of attention-sparse
        # layers (`modules.stream.PermutedStream`); set with `split`, so a recompute sees the same value
        self.stream_permuted = False
        self.stream_layers: set[int] = set()  # the layers inside a `PermutedStream` run (set by apply_sparselora)
        self.layers: dict[int, list] = {}  # layer index -> its wrappers (SparseMLP / SparseAttention)
        # layer -> its FFN `selection.RunningScore`, committed at every begin_batch
        self.running_scores: dict[int, object] = {}
        self.ffn_probe = None  # called by each sparse FFN with its context rows (calibrate.allocate_sample_rows)
        self.fused: list = []  # FusedLoRALinear wrappers of the projections not sliced
        self.handles: list = []
        self.hub_kernels = False  # transformers' hub kernels were on before apply (patch.apply_sparselora)
        self.graphed = False  # a CUDAGraphTrainer trains this model (SparseLoRACallback warns of an eager GPU run)

    def permuted_at(self, layer: int) -> bool:
        """Whether layer ``layer`` sees the residual stream context-first in this forward."""
        return self.stream_permuted and layer in self.stream_layers

    @property
    def active(self) -> bool:
        return self.enabled and self.scheduled_on

    # -- the lifecycle ---------------------------------------------------------------------------------------
    def begin_batch(
        self, labels: torch.Tensor | None, attention_mask: torch.Tensor | None, shape: tuple[int, int],
        hidden_states_out: bool = False,
    ) -> TokenSplit | None:
        """Start a forward of a batch of ``shape`` (batch, seq): validate the labels, set and return `split`.
        ``hidden_states_out``: the forward returns every layer's hidden states, so the stream stays in order."""
        self.split = None
        self.stream_permuted = False
        commit_running(self.running_scores.values())  # the last forward's scores: this one's past
        if labels is None:
            return None
        check_labels(labels, shape)
        if self._pinned is not None:
            self.split = self._pinned.split if self.active else None
        elif self.active:
            self.split = split_tokens(labels, attention_mask, shape, self.config.dense_output_tokens)
        split = self.split
        # a batch the sparse layers run dense (`nothing_to_rank`) is not permuted either
        self.stream_permuted = split is not None and not hidden_states_out and not self.nothing_to_rank
        return self.split

    def reset_running_scores(self) -> None:
        for r in self.running_scores.values():
            r.reset()

    def running_scores_state(self) -> dict[str, torch.Tensor]:
        """``{"ffn.<layer>": scores}`` of the layers that have run sparse (what a checkpoint keeps): copies on the
        scores' device, so that taking them at every step's start costs no host sync."""
        return {f"ffn.{i}": r.latest().clone() for i, r in self.running_scores.items() if r.latest() is not None}

    def load_running_scores(self, tensors: dict[str, torch.Tensor], device) -> None:
        """Continue the averages of `running_scores_state` (a resumed run). A layer this config does not average
        is an error: the checkpoint belongs to another config."""
        unknown = sorted(k for k in tensors if not k.startswith("ffn.") or int(k[4:]) not in self.running_scores)
        if unknown:
            raise ValueError(f"saved running FFN scores {unknown} match no averaged layer of this config (layers "
                             f"{sorted(self.running_scores)}): the checkpoint was made with another sparsity config")
        for key, t in tensors.items():
            self.running_scores[int(key[4:])].load(t.to(device))

    @contextlib.contextmanager
    def running_scores_kept(self) -> Iterator[None]:
        """Forwards inside leave the running FFN scores as they were (CUDA-graph warm-ups: they repeat a batch,
        which training should see once). Buffers first allocated inside are kept, zeroed (graphs read them)."""
        rs = list(self.running_scores.values())
        saved = [None if r.running is None else (r.running.clone(), r.pending.clone()) for r in rs]
        try:
            yield
        finally:
            for r, s in zip(rs, saved):
                if s is None:
                    r.reset()
                else:
                    r.running.copy_(s[0])
                    r.pending.copy_(s[1])

    @property
    def nothing_to_rank(self) -> bool:
        """A labelled-rows selector and a batch without labelled rows: nothing to rank the channels by (and no
        loss to train), so the sparse layers run this batch dense."""
        split = self.split
        return split is not None and SELECTORS[self.config.selector].scores_labelled and split.num_labelled == 0

    @contextlib.contextmanager
    def pinned(self, split: TokenSplit | None, head_rows: int | None) -> Iterator[None]:
        """Forwards inside use ``split`` as is (None: dense) instead of computing one, and the labelled-only
        head computes ``head_rows`` rows."""
        if self._pinned is not None:
            raise RuntimeError("sparselora: state.pinned(...) is already active (a graph step inside another)")
        self._pinned = Pinned(split, head_rows)
        try:
            yield
        finally:
            self._pinned = None

    @property
    def head_rows(self) -> int | None:
        """The labelled-only head's row count while pinned; None (the exact count) otherwise."""
        return None if self._pinned is None else self._pinned.head_rows

    def end_replay(self, split: TokenSplit | None) -> None:
        """After a CUDA-graph replay, which runs no Python forward: the split the replayed forward used."""
        self.split = split
