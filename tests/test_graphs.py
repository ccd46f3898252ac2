"""CUDAGraphStep's path (pinned split, sync-free labelled-only loss) against the plain step; the capture itself
is checked against eager steps in test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from sparselora import CUDAGraphStep, SparseLoRAConfig, apply_sparselora
from sparselora.ops.fused_kernels import labelled_cross_entropy

from helpers import assert_close, assert_step_matches_reference, clone, lora_grads, make_batch, tiny_peft


def _cfg(selector="svd"):
    return SparseLoRAConfig(ffn_sparsity={"1-2": 0.6}, attn_sparsity={"1-2": 0.5}, selector=selector, start_step=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("selector", ["svd", "labelled"])
def test_pinned_path_matches_plain_step(padding_side, selector):
    model = tiny_peft("qwen2")
    ref = clone(model)
    apply_sparselora(model, _cfg(selector), fast_kernels=True)
    apply_sparselora(ref, _cfg(selector), fast_kernels=True)
    step = CUDAGraphStep(model, capture=False, bucket=1)
    for seed, labelled in ((1, (3, 5, 1)), (2, (2, 4, 1)), (3, (3, 5, 1))):  # the third reuses the first's
        batch = make_batch(padding_side=padding_side, seed=seed, labelled=labelled)
        assert_step_matches_reference(model, ref, batch, step(**batch))
    assert len(step.graphs) == 2


def test_labelled_loss_without_sync_matches():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 9, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[0, :5] = -100
    labels[2, 3:] = -100
    rows = int((labels[:, 1:] != -100).sum())
    for num_items in (None, 7):
        assert_close(labelled_cross_entropy(hidden, weight, labels, num_items, rows),
                     labelled_cross_entropy(hidden, weight, labels, num_items), "loss", torch.float32)


def test_bad_input():
    model = tiny_peft("llama")
    apply_sparselora(model, _cfg(), fast_kernels=True)
    step = CUDAGraphStep(model, capture=False, bucket=1)
    batch = make_batch()
    with pytest.raises(ValueError, match="input_ids and labels required"):
        step(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="labels have shape"):
        step(input_ids=batch["input_ids"], labels=batch["labels"][:, 1:])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            CUDAGraphStep(model)
    for kw in ({"slack": -1}, {"promote_after": 0}):
        with pytest.raises(ValueError, match="slack must be >= 0 .* promote_after >= 1"):
            CUDAGraphStep(model, capture=False, **kw)


def test_gradients_accumulate_and_scale():
    """New gradients are added to a p.grad already set, times grad_scale (1 / accumulation steps)."""
    model = tiny_peft("llama")
    apply_sparselora(model, _cfg(), fast_kernels=True)
    step = CUDAGraphStep(model, capture=False, bucket=1)
    batch = make_batch()
    step(**batch)
    once = lora_grads(model)
    step(**batch)
    twice = lora_grads(model)
    model.zero_grad(set_to_none=True)
    step(grad_scale=0.25, **batch)
    step(grad_scale=0.25, **batch)
    half = lora_grads(model)
    for n in once:
        assert_close(twice[n], 2 * once[n], f"accumulated {n}", torch.float32)
        assert_close(half[n], 0.5 * once[n], f"scaled {n}", torch.float32)
