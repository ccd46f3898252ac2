"""Per-model SparseLoRA state shared by the layer wrappers: the switch, the schedule and the current batch's
context/output split. It lives on the model instance, never on a class."""

from __future__ import annotations

from sparselora.config import SparseLoRAConfig
from sparselora.estimator import Estimator
from sparselora.models.registry import ArchInfo
from sparselora.tokens import TokenSplit

STATE_ATTR = "_sparselora_state"


class SparseLoRAState:
    def __init__(self, config: SparseLoRAConfig, arch: ArchInfo, estimator: Estimator | None):
        self.config = config
        self.arch = arch
        self.estimator = estimator
        self.enabled = True
        self.scheduled_on = config.start_step == 0
        # Set by the model's forward pre-hook and kept until the next forward, so that gradient checkpointing
        # recomputes layers with the same split during backward.
        self.split: TokenSplit | None = None
        # Set by CUDAGraphStep around a captured/replayed forward: the split to use as is (False: none) instead of
        # computing one (which syncs with the host), and the labelled-only head's row count.
        self.pinned_split: TokenSplit | bool | None = None
        self.head_rows: int | None = None
        # Round the sparse row count down to a multiple of this (see `split_tokens`); CUDAGraphStep buckets its own.
        self.bucket = 1
        self.layers: dict[int, list] = {}  # layer index -> its wrappers (SparseMLP / SparseAttention)
        self.fused: list = []  # FusedLoRALinear wrappers of the projections not sliced
        self.handles: list = []

    @property
    def active(self) -> bool:
        return self.enabled and self.scheduled_on
