"""Padding collator for tokenized examples (labels padded with -100 so padding carries no loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .tokenize import IGNORE_INDEX

__all__ = ["DataCollator"]


@dataclass
class DataCollator:
    """Pads a list of feature dicts to the longest (optionally a multiple of `pad_to_multiple_of`).

    Right padding by default, as training wants; `padding_side="left"` for generation. `pad_token_id`
    defaults to the tokenizer's pad token, else its EOS.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    label_pad_id: int = IGNORE_INDEX

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        if self.pad_token_id is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
            self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("DataCollator needs a pad_token_id (or a tokenizer with a pad or eos token)")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollator got an empty batch")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.label_pad_id}
        keys = [k for k in fill if k in features[0]]
        batch = {}
        for key in keys:
            rows = []
            for f in features:
                seq = list(f[key])
                pad = [fill[key]] * (longest - len(seq))
                rows.append(seq + pad if self.padding_side == "right" else pad + seq)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "attention_mask" not in batch:
            lengths = [len(f["input_ids"]) for f in features]
            mask = [
                [1] * n + [0] * (longest - n) if self.padding_side == "right" else [0] * (longest - n) + [1] * n
                for n in lengths
            ]
            batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        return batch
