"""Public API behaviour: switches, schedule, removal, isolation, estimator cache, and bad input."""

from __future__ import annotations


import pytest
import torch

import sparselora
from sparselora import (
    EstimatorCacheError,
    SparseLoRAConfig,
    UnsupportedModelError,
    apply_sparselora,
    kept_channels,
    remove_sparselora,
)
from sparselora.estimator import Estimator

from helpers import assert_close, clone, make_batch, tiny_peft


def cfg(**kw):
    kw.setdefault("start_step", 0)
    return SparseLoRAConfig(ffn_sparsity={1: 0.8, 2: 0.8}, attn_sparsity={2: 0.5}, **kw)


def loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss


def test_set_enabled_and_dense_context_manager():
    model, batch = tiny_peft(), make_batch()
    ref = clone(model)
    apply_sparselora(model, cfg())
    sparse = loss(model, batch)
    assert not torch.allclose(sparse, loss(ref, batch))
    with sparselora.dense(model):
        assert_close(loss(model, batch), loss(ref, batch), "dense()")
    assert_close(loss(model, batch), sparse, "after dense()")
    sparselora.set_enabled(model, False)
    assert_close(loss(model, batch), loss(ref, batch), "disabled")
    sparselora.set_enabled(model, True)
    assert_close(loss(model, batch), sparse, "re-enabled")


def test_warmup_schedule():
    model, batch = tiny_peft(), make_batch()
    ref = clone(model)
    apply_sparselora(model, cfg(start_step=0.1))
    dense = loss(ref, batch)
    assert_close(loss(model, batch), dense, "before schedule: dense")
    assert sparselora.schedule(model, 9, 100) is False
    assert_close(loss(model, batch), dense, "step 9 of 100")
    assert sparselora.schedule(model, 10, 100) is True
    assert not torch.allclose(loss(model, batch), dense)
    # a step count instead of a fraction
    remove_sparselora(model)
    apply_sparselora(model, cfg(start_step=5))
    assert sparselora.schedule(model, 4) is False and sparselora.schedule(model, 5) is True
    with pytest.raises(ValueError, match="total"):
        remove_sparselora(model)
        apply_sparselora(model, cfg(start_step=0.5))
        sparselora.schedule(model, 3)


def test_remove_restores_and_other_models_untouched():
    model, batch = tiny_peft(), make_batch()
    other = clone(model)
    before_other = loss(other, batch)
    keys = list(model.state_dict())
    apply_sparselora(model, cfg())
    assert list(model.state_dict()) == keys, "module names must not change (PEFT save/load)"
    assert_close(loss(other, batch), before_other, "second model in the process")
    remove_sparselora(model)
    assert_close(loss(model, batch), before_other, "after remove")
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_pre_hooks
    apply_sparselora(model, cfg())  # applying again after removal works


def test_apply_twice_is_an_error():
    model = tiny_peft()
    apply_sparselora(model, cfg())
    with pytest.raises(ValueError, match="already applied"):
        apply_sparselora(model, cfg())


def test_peft_adapter_saves_plain(tmp_path):
    from peft import PeftModel

    model, batch = tiny_peft(), make_batch()
    apply_sparselora(model, cfg())
    model.save_pretrained(tmp_path)
    from helpers import tiny_model

    base = tiny_model()  # same seed: same base weights
    loaded = PeftModel.from_pretrained(base, tmp_path)
    with sparselora.dense(model):
        assert_close(loss(loaded, batch), loss(model, batch), "reloaded adapter")


def test_kept_channels_and_stats():
    model, batch = tiny_peft(), make_batch()
    apply_sparselora(model, cfg())
    model(**batch)
    kept = kept_channels(model)
    assert set(kept) == {1, 2}
    assert kept[1]["ffn"].numel() == round(0.2 * 86)
    assert set(kept[2]) == {"ffn", "q", "k", "v", "o"}
    assert kept[2]["q"].numel() == 2 * kept[2]["k"].numel()  # 2 query heads per kv head
    stats = sparselora.sparsity_stats(model)
    assert stats["sparselora/active"] == 1.0
    assert 0 < stats["sparselora/context_fraction"] < 1


def test_batch_without_context_runs_dense():
    model = tiny_peft()
    ref = clone(model)
    apply_sparselora(model, cfg())
    batch = make_batch(labelled=(24, 17, 11))
    assert_close(loss(model, batch), loss(ref, batch), "no context")


# --- estimator cache ------------------------------------------------------------------------------------------


def test_estimator_cache_is_reused_and_checked(tmp_path, monkeypatch):
    model = tiny_peft()
    apply_sparselora(model, cfg(selector="svd"), estimator_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    est = sparselora.patch.get_state(model).estimator
    # second apply must load, not rebuild
    import sparselora.estimator as E

    monkeypatch.setattr(E, "low_rank_factors", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    other = tiny_peft()
    apply_sparselora(other, cfg(selector="svd"), estimator_dir=tmp_path)
    est2 = sparselora.patch.get_state(other).estimator
    for k in est.factors:
        assert torch.equal(est.factors[k], est2.factors[k])
    monkeypatch.undo()
    # a different model gets its own file, never the first one's
    third = tiny_peft(seed=5)
    apply_sparselora(third, cfg(selector="svd"), estimator_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # a file planted under another model's name is refused
    files = sorted(tmp_path.glob("*.safetensors"))
    files[0].write_bytes(files[1].read_bytes())
    with pytest.raises(EstimatorCacheError, match="other weights"):
        Estimator.build(_weights_for(files[0]), 8, tmp_path)


def _weights_for(path):
    """The weights whose fingerprint names ``path``: seed 0's or seed 5's model."""
    for seed in (0, 5):
        hf = tiny_peft(seed=seed).get_base_model()
        w = sparselora.patch._estimator_weights(hf, cfg())
        fp = sparselora.estimator.fingerprint({f"{i}.{p}": t for (i, p), t in w.items()})
        if path.name.startswith(f"estimator-{fp[:24]}"):
            return w
    raise AssertionError("no model matches")


def test_low_rank_factors_are_the_truncated_svd():
    torch.manual_seed(0)
    w = torch.randn(70, 40, dtype=torch.float64)
    a, b = sparselora.estimator.low_rank_factors(w, 6)
    u, s, vh = torch.linalg.svd(w.T, full_matrices=False)  # W^T = U S V^T
    best = (u[:, :6] * s[:6]) @ vh[:6]
    assert_close((a.double() @ b.double()), best, "A @ B", rtol=1e-4, atol=1e-4)
    assert_close(a.double().norm(dim=0) ** 2, s[:6], "A column norms = singular values", rtol=1e-4, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------------------


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama"):
        apply_sparselora(model, cfg())


def test_layer_outside_model():
    with pytest.raises(ValueError, match="has 4 layers"):
        apply_sparselora(tiny_peft(), SparseLoRAConfig(ffn_sparsity={7: 0.5}, start_step=0))


def test_rank_too_large():
    with pytest.raises(ValueError, match="estimator_rank"):
        apply_sparselora(tiny_peft(), cfg(estimator_rank=41))


def test_labels_shape_mismatch():
    model, batch = tiny_peft(), make_batch()
    apply_sparselora(model, cfg())
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(ValueError, match="one label per input token"):
        model(**batch)


def test_4d_attention_mask_refused():
    model, batch = tiny_peft(), make_batch()
    apply_sparselora(model, cfg())
    batch["attention_mask"] = batch["attention_mask"][:, None, None, :].float()
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(**batch)


def test_dora_refused():
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["gate_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        apply_sparselora(model, cfg())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_kernels_same_loss_and_gradients(arch):
    """fast_kernels=True (fused norm/activation, labelled-only head) trains exactly like the plain path."""
    from helpers import step_outputs

    model, batch = tiny_peft(arch), make_batch(seed=6)
    fast = clone(model)
    apply_sparselora(model, cfg())
    apply_sparselora(fast, cfg(), fast_kernels=True)
    _, loss, grads = step_outputs(model, batch, embed_grad=False)
    _, fast_loss, fast_grads = step_outputs(fast, batch, embed_grad=False)
    assert_close(fast_loss, loss, "loss")
    for n in grads:
        assert_close(fast_grads[n], grads[n], f"grad {n}")
    assert fast(**batch).logits is None
    batch.pop("labels")
    assert fast(**batch).logits is not None  # without labels: the ordinary forward
    remove_sparselora(fast)
    for m in fast.modules():
        assert "forward" not in m.__dict__


def test_estimator_factors_follow_the_input_device():
    """`Estimator.stacked(..., device)` moves every factor once to the input's device (a model moved after
    `apply_sparselora`); the meta device stands in for a GPU here."""
    w = {(0, "gate"): torch.randn(16, 8), (0, "up"): torch.randn(16, 8)}
    est = Estimator.build(w, 4)
    a, bs = est.stacked(0, ("gate", "up"), torch.device("cpu"))
    assert a.device.type == "cpu" and a.shape == (8, 8)
    a, bs = est.stacked(0, ("gate", "up"), torch.device("meta"))
    assert a.device.type == "meta" and all(b.device.type == "meta" for b in bs)
    assert all(v.device.type == "meta" for v in est.factors.values())
