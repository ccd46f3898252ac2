"""Padding-free batches of one fixed shape: examples packed into rows of a token budget.

Real data has rows of every length; padded to the longest, a batch wastes compute on padding and every batch has
a new shape, so a CUDA graph captured for one fits no other. Packed, every row has exactly ``max_tokens`` slots,
filled with whole examples (best fit over a few open rows, data order kept otherwise) and a padded tail.
`PackedCollator` emits what a segment-isolated attention needs (`sparselora.ops.varlen`): per-segment
``position_ids`` and ``cu_seq_lens_q/k`` of a fixed length (unused slots are zero-length segments), so every
batch of a run has the same tensors shapes.

    packs = pack_features(features, max_tokens=4096)
    collator = PackedCollator(pad_token_id=tok.pad_token_id, max_tokens=4096)
    # Trainer(..., train_dataset=packs, data_collator=collator, per_device_train_batch_size=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .tokenize import IGNORE_INDEX

__all__ = ["PackedCollator", "pack_features"]

OPEN_ROWS = 8  # rows kept open for best fit: enough to waste little, few enough to keep the data order


def pack_features(features: Sequence[dict[str, Any]], max_tokens: int, max_segments: int = 32) -> list[dict]:
    """Group tokenized examples (``input_ids``, ``labels``) into packs of at most ``max_tokens`` tokens and
    ``max_segments`` examples. Each pack: ``input_ids``, ``labels`` (concatenated) and ``seq_lens``."""
    if max_tokens < 1 or max_segments < 1:
        raise ValueError(f"max_tokens and max_segments must be >= 1, got {max_tokens} and {max_segments}")
    packs: list[dict] = []
    open_rows: list[dict] = []

    def close(row):
        open_rows.remove(row)
        packs.append(row)

    for i, f in enumerate(features):
        n, labels = len(f["input_ids"]), f.get("labels", f["input_ids"])
        if len(labels) != n:
            raise ValueError(f"example {i}: labels and input_ids differ in length ({len(labels)} vs {n})")
        if n == 0:
            continue
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row holds (max_tokens={max_tokens}); "
                             "raise max_tokens or truncate the examples (max_length)")
        fits = [r for r in open_rows if r["used"] + n <= max_tokens and len(r["seq_lens"]) < max_segments]
        if fits:
            row = min(fits, key=lambda r: max_tokens - r["used"] - n)
        else:
            if len(open_rows) == OPEN_ROWS:
                close(max(open_rows, key=lambda r: r["used"]))
            row = {"input_ids": [], "labels": [], "seq_lens": [], "used": 0}
            open_rows.append(row)
        row["input_ids"] += list(f["input_ids"])
        # a segment's first token is never a target (nothing precedes it): so the shifted loss of the packed row
        # never predicts one example from the end of the one before
        row["labels"] += [IGNORE_INDEX] + list(labels)[1:]
        row["seq_lens"].append(n)
        row["used"] += n
        if row["used"] == max_tokens or len(row["seq_lens"]) == max_segments:
            close(row)
    packs += open_rows
    for p in packs:
        del p["used"]
    return packs


@dataclass
class PackedCollator:
    """Stacks packs (from `pack_features`) into a (batch, max_tokens) batch with segment boundaries.

    ``max_segment_len`` bounds every segment (examples and the padded tail, which is split into pieces of at most
    that length) and is passed to the attention kernel as its max length: set it to the longest example
    (the truncation length) to keep the kernel's grid small. ``max_segments`` must match `pack_features`.
    """

    pad_token_id: int
    max_tokens: int
    max_segments: int = 32
    max_segment_len: int | None = None
    label_pad_id: int = IGNORE_INDEX

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("PackedCollator needs a pad_token_id (the tokenizer's pad or eos token)")
        if self.max_segment_len is None:
            self.max_segment_len = self.max_tokens
        if not 1 <= self.max_segment_len <= self.max_tokens:
            raise ValueError(f"max_segment_len must be in 1..max_tokens={self.max_tokens}, got {self.max_segment_len}")
        tail = -(-self.max_tokens // self.max_segment_len)
        self.slots = self.max_segments + tail  # segments per row, padded to a fixed count

    def __call__(self, packs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not packs:
            raise ValueError("PackedCollator got an empty batch")
        T, L = self.max_tokens, self.max_segment_len
        ids, labels, mask, pos, cu = [], [], [], [], [0]
        for b, p in enumerate(packs):
            if "seq_lens" not in p:
                raise ValueError("PackedCollator takes packs from sparselora.data.pack_features, not plain examples")
            n = sum(p["seq_lens"])
            if n > T or len(p["seq_lens"]) > self.max_segments or max(p["seq_lens"]) > L:
                raise ValueError(f"pack {b} ({n} tokens, {len(p['seq_lens'])} segments, longest "
                                 f"{max(p['seq_lens'])}) does not fit max_tokens={T}, max_segments="
                                 f"{self.max_segments}, max_segment_len={L}; pack with the same limits")
            pad = T - n
            ids.append(list(p["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(p["labels"]) + [self.label_pad_id] * pad)
            mask.append([1] * n + [0] * pad)
            lens = list(p["seq_lens"]) + [L] * (pad // L) + ([pad % L] if pad % L else [])
            pos.append([i for s in lens for i in range(s)])
            start = b * T
            for s in lens:
                start += s
                cu.append(start)
            cu += [start] * (self.slots - len(lens))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long),
            "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
            "max_length_q": L,
            "max_length_k": L,
        }
