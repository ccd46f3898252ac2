"""SparseLoRA on tiny random models of every supported family, against PEFT and the masked reference."""

from __future__ import annotations

import pytest
import torch

import sparselora
from sparselora import SparseLoRAConfig, apply_sparselora, kept_channels

from helpers import ARCHS, assert_close, clone, make_batch, step_outputs, tiny_model, tiny_peft
from reference import assert_bf16_close_to_reference, install_reference


def cfg(ffn=0.6, attn=0.5, layers=(1, 2), **kw):
    kw.setdefault("start_step", 0)
    return SparseLoRAConfig(ffn_sparsity={i: ffn for i in layers}, attn_sparsity={i: attn for i in layers}, **kw)


run = step_outputs


def compare(a, b, dtype=torch.float32, what=""):
    la, lossa, ga = a
    lb, lossb, gb = b
    assert_close(la, lb, f"{what} logits", dtype)
    assert_close(lossa, lossb, f"{what} loss", dtype)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert_close(ga[n], gb[n], f"{what} grad {n}", dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_all_channels_kept_reproduces_peft(arch):
    """Sparse ops with every channel kept (sparsity ~0) equal stock PEFT LoRA: logits and every gradient."""
    model = tiny_peft(arch)
    ref = clone(model)
    batch = make_batch()
    apply_sparselora(model, cfg(ffn=1e-9, attn=1e-9, layers=range(4), selector="svd"))  # builds the factors
    for selector in ("svd", "oracle", "sampled"):
        model_state = sparselora.patch.get_state(model)
        model_state.config.selector = selector
        compare(run(model, batch), run(ref, batch), what=f"{arch}/{selector}")
    assert all(v["ffn"].numel() == 86 for v in kept_channels(model).values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("selector", ["sampled", "svd", "labelled", "random", "l2"])
def test_sparse_matches_masked_reference(arch, padding_side, selector):
    model = tiny_peft(arch)
    ref = clone(model)
    batch = make_batch(padding_side=padding_side, seed=3)
    apply_sparselora(model, cfg(selector=selector, layers=(0, 2, 3)))
    torch.manual_seed(0)
    sparse = run(model, batch)
    kept = kept_channels(model)
    assert set(kept) == {0, 2, 3}
    handles = install_reference(ref, kept, batch)
    compare(sparse, run(ref, batch), what=f"{arch}/{padding_side}/{selector}")
    for h in handles:
        h.remove()
    # and sparsity really changed the result
    dense = run(ref, batch)
    assert not torch.allclose(sparse[0], dense[0], atol=1e-4)


def test_rope_pairs_off_matches_reference_and_differs_from_pairs():
    model = tiny_peft("llama")
    ref = clone(model)
    batch = make_batch(seed=5)
    apply_sparselora(model, cfg(ffn=0.5, attn=0.6, rope_pairs=False))
    sparse = run(model, batch)
    kept = kept_channels(model)
    handles = install_reference(ref, kept, batch)
    compare(sparse, run(ref, batch), what="no-pairs")
    for h in handles:
        h.remove()
    k = kept[1]["k"]
    half = 5  # head_dim 10
    paired = set(((k // 10) * 10 + (k % 10 + half) % 10).tolist())
    assert paired != set(k.tolist()), "without pairing, some kept channel should lack its RoPE partner"


def test_plain_hf_model_without_peft():
    model = tiny_model("qwen2")
    ref = clone(model)
    for p in list(model.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    batch = make_batch()
    apply_sparselora(model, cfg())
    sparse = run(model, batch)
    handles = install_reference(ref, kept_channels(model), batch)
    compare(sparse, run(ref, batch), what="plain")
    assert sparse[2] and set(sparse[2]) == {"model.embed_tokens.weight"}
    for h in handles:
        h.remove()


def test_lora_on_attention_only_and_ffn_only():
    for targets in (["q_proj", "v_proj"], ["gate_proj", "down_proj"]):
        model = tiny_peft("llama", targets=targets)
        ref = clone(model)
        batch = make_batch(seed=7)
        apply_sparselora(model, cfg(ffn=0.7, attn=0.7))
        sparse = run(model, batch)
        handles = install_reference(ref, kept_channels(model), batch)
        compare(sparse, run(ref, batch), what=str(targets))
        for h in handles:
            h.remove()


def test_all_tokens_labelled_is_dense_and_long_context_is_not():
    model = tiny_peft("llama")
    ref = clone(model)
    apply_sparselora(model, cfg(ffn=0.9, attn=0.7))
    batch = make_batch(labelled=(24, 17, 11))
    compare(run(model, batch), run(ref, batch), what="all labelled")
    assert kept_channels(model) == {}  # no sparse forward happened
    batch = make_batch(labelled=(2, 2, 2))
    assert not torch.allclose(run(model, batch)[1], run(ref, batch)[1])


def test_no_labels_is_dense():
    model = tiny_peft("mistral")
    ref = clone(model)
    apply_sparselora(model, cfg(ffn=0.9, attn=0.7))
    batch = make_batch()
    batch.pop("labels")
    with torch.no_grad():
        assert_close(model(**batch).logits, ref(**batch).logits, "no labels")


def test_dense_output_tokens_false_makes_every_real_token_sparse():
    model = tiny_peft("llama")
    ref = clone(model)
    batch = make_batch(labelled=(24, 17, 11))  # no context at all: only the switch can make it sparse
    apply_sparselora(model, cfg(dense_output_tokens=False))
    sparse = run(model, batch)
    handles = install_reference(ref, kept_channels(model), batch, dense_output_tokens=False)
    compare(sparse, run(ref, batch), what="dense_output_tokens=False")
    for h in handles:
        h.remove()


def test_finite_differences_float64():
    """Directional derivatives of the sparse loss match autograd (random selector: fixed channels)."""
    model = tiny_peft("qwen2", dtype=torch.float64, attn_implementation="sdpa")
    for m in model.modules():  # transformers' RMSNorm computes in float32; keep float64 for this check
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = (lambda m: lambda x: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))(m)
    batch = make_batch(seed=11)
    apply_sparselora(model, cfg(ffn=0.6, attn=0.5, selector="random"))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():  # computed here: transformers' loss casts logits to float32
        torch.manual_seed(123)
        logits = model(**batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))

    model.zero_grad()
    loss().backward()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        d = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        analytic = sum((p.grad * v).sum() for p, v in zip(params, d))
        eps = 1e-6
        with torch.no_grad():
            for p, v in zip(params, d):
                p.add_(eps * v)
            up = loss()
            for p, v in zip(params, d):
                p.sub_(2 * eps * v)
            down = loss()
            for p, v in zip(params, d):
                p.add_(eps * v)
        numeric = (up - down) / (2 * eps)
        assert_close(numeric, analytic, "directional derivative", rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bf16_as_close_to_float64_as_the_reference(arch, padding_side):
    """bf16 (PEFT's fp32 adapters on a bf16 base): the sparse run is about as far from the float64 reference as
    the bf16 reference itself (same rounding points as PEFT)."""
    model = tiny_peft(arch, dtype=torch.bfloat16, attn_implementation="sdpa")
    ref = clone(model)
    batch = make_batch(padding_side=padding_side, seed=9)
    apply_sparselora(model, cfg(ffn=0.7, attn=0.5, layers=range(4)))
    sparse = run(model, batch)
    assert_bf16_close_to_reference(sparse, ref, kept_channels(model), batch, run)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes_against_reference(dtype):
    model = tiny_peft("llama", dtype=dtype)
    ref = clone(model)
    batch = make_batch(seed=2)
    apply_sparselora(model, cfg(selector="random"))
    torch.manual_seed(0)
    sparse = run(model, batch)
    handles = install_reference(ref, kept_channels(model), batch)
    compare(sparse, run(ref, batch), dtype=dtype, what=str(dtype))
    for h in handles:
        h.remove()


def test_gradient_checkpointing_same_gradients():
    for selector in ("sampled", "svd", "labelled", "random"):
        model = tiny_peft("llama")
        ckpt = clone(model)
        batch = make_batch(seed=4)
        apply_sparselora(model, cfg(selector=selector))
        apply_sparselora(ckpt, cfg(selector=selector))
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ckpt.train()
        model.train()
        torch.manual_seed(0)
        a = run(model, batch)
        torch.manual_seed(0)
        b = run(ckpt, batch)
        compare(a, b, what=f"checkpointing/{selector}")
