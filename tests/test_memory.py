"""What a training step keeps for its backward (CPU memory, docs/performance.md "CPU memory"): the LM head never
holds vocabulary-wide tensors, the fused projections keep no weight copies and a bool dropout mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparselora import SparseLoRAConfig, apply_sparselora
from sparselora.fastpath import choose_path
from sparselora.ops import fused_kernels
from sparselora.ops.fused import split_ffn, split_lora_linear

from helpers import assert_close, clone, make_batch, step_outputs, tiny_peft

VOCAB = 3001  # much wider than the hidden size (40), as a real vocabulary is


def saved_tensors(fn, exclude=()):
    """(shape, dtype, bytes) of every distinct storage autograd saves while ``fn()`` runs, parameters excluded."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, out = set(), []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            out.append((tuple(t.shape), t.dtype, s.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, out


def test_cpu_training_path_keeps_no_vocabulary_wide_tensor(monkeypatch):
    """The path `sparselora finetune` takes on a CPU computes the head and loss on labelled rows, a chunk at a time:
    nothing of the vocabulary's width is saved for the backward (the plain head saved the log-softmax of every
    row, and its gradient and the logits' were as large; 0.35 GB each for SmolLM2 at 4 x 460 tokens), and the loss
    and gradients are the plain path's."""
    monkeypatch.setattr(fused_kernels, "HEAD_CHUNK_BYTES", 4 * VOCAB * 3, raising=False)  # 3 rows a chunk
    batch = make_batch(vocab=VOCAB, labelled=(9, 5, 7), seed=3)
    path = choose_path("cpu", [24, 17, 11], 3, dtype="float32")
    cfg = SparseLoRAConfig(ffn_sparsity={1: 0.5, 2: 0.5}, attn_sparsity={2: 0.5}, start_step=0)
    plain = tiny_peft(vocab_size=VOCAB)
    model = clone(plain)
    apply_sparselora(plain, cfg)
    apply_sparselora(model, cfg, fast_kernels=path.fast_kernels)
    params = list(model.parameters())
    out, saved = saved_tensors(lambda: model(**batch), exclude=params)
    wide = [s for s in saved if VOCAB in s[0]]
    assert not wide, f"vocabulary-wide tensors saved for the backward: {wide}"
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    head = [s for s in saved if s[0] == (labelled, 40)]  # the head's input gradient, the only thing it keeps
    assert head, saved
    _, loss, grads = step_outputs(plain, batch, embed_grad=False)
    _, fast_loss, fast_grads = step_outputs(model, batch, embed_grad=False)
    assert_close(fast_loss, loss, "loss")
    for n in grads:
        assert_close(fast_grads[n], grads[n], f"grad {n}")


@pytest.mark.parametrize("num_items", [None, 13.0])
@pytest.mark.parametrize("num_rows", [None, 40])
def test_chunked_head_loss_is_cross_entropy(monkeypatch, num_items, num_rows):
    """The chunked head loss equals F.cross_entropy over the full logits (float64: to rounding), with the mean
    over labelled tokens or the Trainer's sum / num_items, and padded rows (num_rows beyond the labelled count:
    a bucketed head) contributing nothing."""
    monkeypatch.setattr(fused_kernels, "HEAD_CHUNK_BYTES", 4 * VOCAB * 7)
    g = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(3, 24, 40, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, 40, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (3, 24), generator=g)
    labels[:, :12] = -100
    hidden = hidden0.clone().requires_grad_()
    n = None if num_items is None else torch.tensor(num_items, dtype=torch.float64)
    loss = fused_kernels.labelled_cross_entropy(hidden, weight, labels, n, num_rows)
    loss.backward()
    ref_h = hidden0.clone().requires_grad_()
    logits = (ref_h @ weight.t())[:, :-1].reshape(-1, VOCAB)
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="mean" if n is None else "sum")
    ref = ref if n is None else ref / n
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["out", "in"])
def test_fused_projection_saves_a_bool_mask_and_no_weight_slice(mode):
    """The fused LoRA projection keeps its input, the LoRA activations and a bool dropout mask (was float: 4x),
    not a copy of the sliced base weight (selected again in the backward)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from sparselora.ops.lora_layer import lora_parts

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(37, 53)

    torch.manual_seed(0)
    m = get_peft_model(Block(), LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=0.3))
    proj = m.base_model.model.proj
    x = torch.randn(19, 37, requires_grad=True)
    idx = torch.tensor([0, 3, 4, 17, 36])
    _, saved = saved_tensors(lambda: split_lora_linear(lora_parts(proj), x, 7, mode, idx),
                             exclude=list(m.parameters()) + [x, idx])
    shapes = {(s[0], s[1]) for s in saved}
    assert ((19, 37), torch.bool) in shapes, saved  # the dropout mask
    assert shapes == {((19, 37), torch.bool), ((19, 3), torch.float32)}, saved  # and the LoRA activations


def test_fused_ffn_saves_no_weight_slices():
    """The fused FFN keeps the gate/up activations (and its channel list), not sliced copies of the three weights."""
    g = torch.Generator().manual_seed(0)
    wg, wu, wd = (torch.randn(86, 40, generator=g), torch.randn(86, 40, generator=g), torch.randn(40, 86, generator=g))
    x = torch.randn(30, 40, generator=g, requires_grad=True)
    keep = torch.tensor([1, 5, 8, 20, 33, 60, 85])
    _, saved = saved_tensors(lambda: split_ffn((wg, None, wu, None, wd, None), x, 12, keep), exclude=[wg, wu, wd, keep])
    assert sorted(s[0] for s in saved) == [(12, 7), (12, 7), (18, 86), (18, 86)], saved


@pytest.mark.parametrize("mode", ["ffn", "out", "in"])
def test_kept_slices_branch_is_bitwise_the_resliced_one(monkeypatch, mode):
    """On a GPU the fused ops keep the sliced weights for the backward instead of slicing again (`_save_slices`);
    forced here on the CPU, that branch gives bitwise the same output and input gradient, and saves the slices."""
    import sparselora.ops.fused as fused

    g = torch.Generator().manual_seed(1)
    if mode == "ffn":
        ws = (torch.randn(86, 40, generator=g), torch.randn(86, 40, generator=g), torch.randn(40, 86, generator=g))
        keep = torch.tensor([1, 5, 8, 20, 33, 60, 85])
        run = lambda x: split_ffn((ws[0], None, ws[1], None, ws[2], None), x, 12, keep)  # noqa: E731
        x0, excl = torch.randn(30, 40, generator=g), list(ws) + [keep]
    else:
        from peft import LoraConfig, get_peft_model
        from torch import nn

        from sparselora.ops.lora_layer import lora_parts

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(37, 53)

        torch.manual_seed(0)
        m = get_peft_model(Block(), LoraConfig(r=3, lora_alpha=5, target_modules=["proj"]))
        proj = m.base_model.model.proj
        idx = torch.tensor([0, 3, 4, 17, 36])
        run = lambda x: split_lora_linear(lora_parts(proj), x, 7, mode, idx)  # noqa: E731
        x0, excl = torch.randn(19, 37, generator=g), list(m.parameters()) + [idx]
    outs = []
    for keep_slices in (False, True):
        monkeypatch.setattr(fused, "_save_slices", lambda x: keep_slices)
        x = x0.clone().requires_grad_(True)
        y = run(x)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), x.grad))
        _, saved = saved_tensors(lambda: run(x0.clone().requires_grad_(True)), exclude=excl)
        n_sliced = sum(s[0] in {(7, 40), (40, 7), (5, 37), (53, 5)} for s in saved)
        assert (n_sliced > 0) == keep_slices, (keep_slices, saved)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_chunked_head_loss_under_autocast(monkeypatch):
    """Under autocast (the Trainer's bf16=True) a frozen head still takes the chunked loss: the GEMMs in the
    autocast dtype, as nn.Linear's under autocast, and nothing vocabulary-wide saved for the backward (the
    graphed Trainer step used to form the full float32 logits here: GBs at a 152k vocabulary). Same loss and
    input gradient as F.cross_entropy over the autocast logits."""
    monkeypatch.setattr(fused_kernels, "HEAD_CHUNK_BYTES", 4 * VOCAB * 7)
    g = torch.Generator().manual_seed(1)
    hidden0 = torch.randn(3, 24, 40, generator=g).to(torch.bfloat16)
    weight = torch.randn(VOCAB, 40, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (3, 24), generator=g)
    labels[:, :10] = -100
    num_rows = int((labels[:, 1:] != -100).sum()) + 5  # a bucketed head: 5 padding rows
    hidden = hidden0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, saved = saved_tensors(lambda: fused_kernels.labelled_cross_entropy(hidden, weight, labels, None, num_rows),
                                    exclude=[weight])
    assert not [s for s in saved if VOCAB in s[0]], saved
    loss.backward()
    ref_h = hidden0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (ref_h @ weight.t())[:, :-1].reshape(-1, VOCAB).float()
        ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1))
    ref.backward()
    assert_close(loss, ref, "loss", torch.bfloat16)
    assert_close(hidden.grad, ref_h.grad, "hidden grad", torch.bfloat16)
