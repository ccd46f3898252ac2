"""Context/output split of a batch: which token positions may take the sparse path.

Context tokens are real (attention_mask == 1) tokens whose label is -100; everything else (labelled tokens and
padding) stays dense. The split is per token, so any padding side, any per-sample lengths and packed
multi-segment rows are handled alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparselora.ops.indexing import permute_rows

IGNORE_INDEX = -100


@dataclass
class TokenSplit:
    """Flat indices (into batch*seq) of context and dense tokens, and the inverse of their concatenation."""

    order: torch.Tensor  # (N,) long: context rows, then labelled rows, then the rest (padding), each in original order
    inverse: torch.Tensor  # (N,) long: inverse permutation of ``order``
    num_context: int
    shape: tuple[int, int]  # (batch, seq)
    num_labelled: int = 0  # the first rows after the context rows: real tokens with a label

    @property
    def ctx(self) -> torch.Tensor:
        return self.order[: self.num_context]

    @property
    def dense(self) -> torch.Tensor:
        return self.order[self.num_context :]

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[:2]) != self.shape:
            raise RuntimeError(
                f"sparselora: a layer saw input of shape {tuple(x.shape)} but the batch split was made for "
                f"(batch, seq) = {self.shape}; the model was called inside another forward, or a layer "
                "changes the sequence length, which SparseLoRA does not support"
            )

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x (batch, seq, d) as a (batch*seq, d) matrix, context rows first."""
        self._check(x)
        return permute_rows(x.reshape(-1, x.shape[-1]), self.order, self.inverse)

    def stream_rows(self, x: torch.Tensor, permuted: bool) -> torch.Tensor:
        """`permute` of a residual-stream tensor; a view when the stream already runs permuted (``permuted``:
        `modules.stream.PermutedStream` reordered it at the run's first layer)."""
        if not permuted:
            return self.permute(x)
        self._check(x)
        return x.reshape(-1, x.shape[-1])

    def stream_of(self, y: torch.Tensor, permuted: bool) -> torch.Tensor:
        """Inverse of `stream_rows`: (batch, seq, d) in the stream's order."""
        return y.view(*self.shape, y.shape[-1]) if permuted else self.unpermute(y)

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of x (batch, seq, d) for context tokens and for dense tokens."""
        rows = self.permute(x)
        return rows[: self.num_context], rows[self.num_context :]

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `permute`: (batch, seq, d) from context-first rows."""
        return permute_rows(y, self.inverse, self.order).view(*self.shape, y.shape[-1])

    def scatter(self, y_ctx: torch.Tensor, y_dense: torch.Tensor, permuted: bool = False) -> torch.Tensor:
        """Inverse of `gather` (of `stream_rows` when ``permuted``): (batch, seq, d) from the two row sets."""
        return self.stream_of(torch.cat([y_ctx, y_dense.to(y_ctx.dtype)], 0), permuted)


def context_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None, dense_output_tokens: bool = True):
    """Boolean (batch, seq) mask of tokens that may run sparse."""
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return real & (labels == IGNORE_INDEX) if dense_output_tokens else real


def check_labels(labels: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    """The one check of the labels' shape: one label per input token."""
    if tuple(labels.shape) != tuple(input_shape):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but input_ids have {tuple(input_shape)}; pass one label per "
            "input token (-100 for prompt and padding tokens)"
        )


def split_masks(
    labels: torch.Tensor, attention_mask: torch.Tensor | None, input_shape: tuple[int, ...],
    dense_output_tokens: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat boolean masks of the context tokens (may run sparse) and of the labelled tokens (real, labelled, not
    context); no host sync. ``labels`` must have ``input_shape`` (`check_labels`, done once where a batch enters:
    `SparseLoRAState.begin_batch`, `CUDAGraphStep`)."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"sparselora needs a 2-D attention_mask (batch, seq) to tell padding from context, got "
                f"{attention_mask.dim()}-D; pass the tokenizer's mask, or none for unpadded/packed batches"
            )
        if tuple(attention_mask.shape) != tuple(input_shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs have {tuple(input_shape)}"
            )
    mask = context_mask(labels, attention_mask, dense_output_tokens).reshape(-1)
    real = torch.ones_like(mask) if attention_mask is None else attention_mask.reshape(-1).bool()
    labelled = real & (labels.reshape(-1) != IGNORE_INDEX) & ~mask
    return mask, labelled


def split_from_masks(
    context: torch.Tensor, labelled: torch.Tensor, num_context: int, num_labelled: int, input_shape: tuple[int, ...]
) -> TokenSplit | None:
    """The split whose sparse rows are the first ``num_context`` context tokens (at most all of them; the rest
    run dense, exactly), from `split_masks`; None when ``num_context`` is 0. No host sync: the counts are given."""
    if num_context == 0:
        return None
    mask = context & (torch.cumsum(context, 0) <= num_context)
    key = (~mask).to(torch.int8) + (~mask & ~labelled).to(torch.int8)  # 0 context, 1 labelled, 2 the rest
    order = torch.argsort(key, stable=True)  # each group in original order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return TokenSplit(order, inverse, num_context, (int(input_shape[0]), int(input_shape[1])), num_labelled)


def split_tokens(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    input_shape: tuple[int, ...],
    dense_output_tokens: bool = True,
    bucket: int = 1,
) -> TokenSplit | None:
    """The split for one batch, or None when the batch has no context token (then the step runs dense).

    ``bucket`` > 1 rounds the sparse row count down to a multiple of it: the last few context tokens run dense
    (exact, just not sparse), so the layer shapes of a run take a handful of values and a few CUDA graphs serve
    every batch. A batch with fewer context tokens than one bucket runs dense.
    """
    context, labelled = split_masks(labels, attention_mask, input_shape, dense_output_tokens)
    # the one host sync of a step: layer shapes depend on the context count
    n_ctx, n_lab = torch.stack([context.sum(), labelled.sum()]).tolist()
    return split_from_masks(context, labelled, n_ctx // bucket * bucket, n_lab, input_shape)
