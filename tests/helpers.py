"""Tiny random models of each supported family, batches, and an assert_close that says where it differs."""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def tiny_config(arch: str = "llama", layers: int = 4, **kw):
    # odd sizes on purpose: hidden 40, intermediate 86, GQA 4 query heads over 2 kv heads of dim 10
    common = dict(
        vocab_size=101, hidden_size=40, intermediate_size=86, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    common.update(kw)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    if arch == "qwen3":
        common.setdefault("head_dim", 10)
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw)).to(dtype)
    with torch.no_grad():  # random, non-trivial biases where the family has them (Qwen2 q/k/v)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_peft(arch: str = "llama", dtype=torch.float32, targets=ALL_TARGETS, r: int = 4, seed: int = 0, **kw):
    model = get_peft_model(
        tiny_model(arch, dtype, seed, **kw), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at init would hide every LoRA-path bug
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.2)
    return model


def make_batch(
    batch: int = 3,
    seq: int = 24,
    vocab: int = 101,
    padding_side: str = "right",
    labelled=(3, 5, 1),
    lengths=(24, 17, 11),
    seed: int = 0,
):
    """Per-sample prompts of different lengths with the last ``labelled[i]`` real tokens labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.full((batch, seq), -100)
    for i in range(batch):
        n, lab = lengths[i % len(lengths)], labelled[i % len(labelled)]
        sl = slice(0, n) if padding_side == "right" else slice(seq - n, seq)
        mask[i, sl] = 1
        real = torch.arange(seq)[sl]
        labels[i, real[n - lab :]] = ids[i, real[n - lab :]]
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def clone(model):
    return copy.deepcopy(model)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_lora_grads(model, ref, dtype=torch.float32):
    """Both models hold gradients for the same (non-empty) set of trainable parameters, each close to ref's."""
    g, rg = lora_grads(model), lora_grads(ref)
    assert g.keys() == rg.keys() and g, f"gradients of {sorted(rg)} expected, got {sorted(g)}"
    for n in g:
        assert_close(g[n], rg[n], f"grad {n}", dtype)


def assert_step_matches_reference(model, ref, batch, loss, split=None):
    """``loss`` and ``model``'s LoRA gradients from a step already run on ``batch`` against a plain forward +
    backward of ``ref`` on it (pinned to ``split`` when given: the split a graph step used); clears both models'
    gradients after."""
    from sparselora.patch import get_state

    with get_state(ref).pinned(split, None) if split is not None else contextlib.nullcontext():
        ref_loss = ref(**batch).loss
        ref_loss.backward()
    assert_close(loss, ref_loss.detach(), "loss", torch.float32)
    assert_same_lora_grads(model, ref)
    for m in (model, ref):
        m.zero_grad(set_to_none=True)


def step_outputs(model, batch, embed_grad: bool = True):
    """(logits, loss, LoRA/trainable gradients) of one forward + backward; with ``embed_grad`` the input
    embeddings take a gradient too, so a cut in any path back to the input shows up."""
    model.zero_grad(set_to_none=True)
    model.get_input_embeddings().weight.requires_grad_(embed_grad)
    out = model(**batch)
    out.loss.backward()
    logits = out.logits.detach() if out.logits is not None else None
    return logits, out.loss.detach(), lora_grads(model)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "", dtype=None, rtol=None, atol=None):
    """torch.testing-style check that reports the worst element's index and the relative error."""
    dtype = dtype or expected.dtype
    r, a = TOL.get(dtype, TOL[torch.float32])
    rtol, atol = rtol or r, atol or a
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[diff[bad].argmax()])
        rel = (diff.norm() / expected.norm().clamp_min(1e-30)).item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; worst at {idx}: {actual[idx].item():.6g} vs "
            f"{expected[idx].item():.6g}; relative L2 error {rel:.3g} (rtol={rtol}, atol={atol})"
        )


def packed_batch(seed: int = 0):
    """Four examples (17/9/23/5 tokens, the last 4/3/6/1 labelled) packed into rows of 31 tokens with segment
    boundaries, as `PackedCollator` makes them."""
    from sparselora.data import PackedCollator, pack_features

    g = torch.Generator().manual_seed(seed)
    feats = []
    for n, lab in ((17, 4), (9, 3), (23, 6), (5, 1)):
        ids = torch.randint(1, 101, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n - lab) + ids[n - lab :]})
    return PackedCollator(pad_token_id=0, max_tokens=31, max_segments=4)(pack_features(feats, 31, 4))
