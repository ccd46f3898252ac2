"""SparseLoRAConfig: validation, layer ranges, YAML round trip, presets, FLOPs against the paper."""

from __future__ import annotations

import warnings

import pytest
from transformers import LlamaConfig

from sparselora import SparseLoRAConfig, flops


def test_ranges_and_yaml_roundtrip(tmp_path):
    cfg = SparseLoRAConfig(ffn_sparsity={"3-5": 0.9, 7: 0.5}, attn_sparsity={"1,4-5": 0.25})
    assert cfg.ffn_sparsity == {3: 0.9, 4: 0.9, 5: 0.9, 7: 0.5}
    assert cfg.attn_sparsity == {1: 0.25, 4: 0.25, 5: 0.25}
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert "3-5" in path.read_text()
    assert SparseLoRAConfig.from_yaml(path) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ffn_sparsity": {1: 1.0}}, r"outside \[0, 1\)"),
        ({"ffn_sparsity": {1: -0.1}}, r"outside \[0, 1\)"),
        ({"attn_sparsity": {-1: 0.5}}, "negative"),
        ({"ffn_sparsity": {"3-1": 0.5}}, "cannot read layer key"),
        ({"ffn_sparsity": {"1-3": 0.5, 2: 0.1}}, "listed twice"),
        ({"ffn_sparsity": {1: 0.5}, "estimator_rank": 0}, "estimator_rank"),
        ({"ffn_sparsity": {1: 0.5}, "selector": "magic"}, "selector"),
        ({"ffn_sparsity": {1: 0.5}, "start_step": -1}, "start_step"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseLoRAConfig(**kwargs)


def test_all_dense_warns():
    with pytest.warns(UserWarning, match="every layer dense"):
        SparseLoRAConfig()


def test_unknown_yaml_key(tmp_path):
    with pytest.raises(ValueError, match="unknown SparseLoRAConfig keys"):
        SparseLoRAConfig.from_yaml("ffn_sparsity: {1: 0.5}\nsparsity: 3\n")


def test_presets():
    names = SparseLoRAConfig.presets()
    assert "llama3-8b-math10k" in names and "scaled" in names
    for name in names:
        if name != "scaled":
            SparseLoRAConfig.from_preset(name)
    math = SparseLoRAConfig.from_preset("llama3-8b-math10k")
    assert math.ffn_sparsity == {i: 0.99 for i in range(3, 31)}
    assert sorted(math.attn_sparsity) == [14, 15, 16, 17, 18, 19, 21, 22, 23, 25, 26, 27, 28, 29]
    assert SparseLoRAConfig.from_preset("llama2-13b-csr170k").start_step == 0.10
    with pytest.raises(ValueError, match="unknown preset"):
        SparseLoRAConfig.from_preset("nope")


def test_scaled_preset():
    cfg = SparseLoRAConfig.from_preset("scaled", num_layers=24, ffn_sparsity=0.9, attn_sparsity=0.5)
    assert min(cfg.ffn_sparsity) == 2 and max(cfg.ffn_sparsity) == 22
    assert min(cfg.attn_sparsity) == 12 and 23 not in cfg.attn_sparsity
    with pytest.raises(ValueError, match="num_layers"):
        SparseLoRAConfig.from_preset("scaled")


LLAMA3_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256,
)


def test_flops_match_the_paper():
    # The paper reports 46% of dense FLOPs for the Llama-3-8B Math10K configuration and 65% for CSR170K.
    math = flops(LLAMA3_8B, SparseLoRAConfig.from_preset("llama3-8b-math10k"), (8, 512), 128)
    assert 0.43 < math["ratio"] < 0.50, math
    csr = flops(LLAMA3_8B, SparseLoRAConfig.from_preset("llama3-8b-csr170k"), "8x512", 3)
    assert 0.62 < csr["ratio"] < 0.70, csr
    # dense LoRA step of the 8B model, 4096 tokens: about 6 * 8e9 * 4096 / 3 * 2 ~ 1.2e14 (frozen base: 2/3 of 6ND)
    assert 1.0e14 < math["dense"] < 1.4e14


def test_flops_edge_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        none = flops(LLAMA3_8B, SparseLoRAConfig(), (2, 64), 8)
    assert none["sparse"] == none["dense"]
    all_labelled = flops(LLAMA3_8B, SparseLoRAConfig.from_preset("llama3-8b-math10k"), (2, 64), 64)
    assert all_labelled["sparse"] == pytest.approx(all_labelled["dense"])
    head = flops(LLAMA3_8B, None, (8, 512), 128, labelled_only_head=True)
    assert head["lm_head"] == pytest.approx(4 * 4096 * 128256 * 8 * 128)
    with pytest.raises(ValueError, match="labelled_tokens"):
        flops(LLAMA3_8B, None, (8, 512), 600)
    with pytest.raises(ValueError, match="8x512"):
        flops(LLAMA3_8B, None, "8by512", 6)


def test_flops_refuses_layers_the_model_lacks():
    small = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=100)
    with pytest.raises(ValueError, match="has 30 layers"):
        flops(small, SparseLoRAConfig.from_preset("llama3-8b-math10k"), (8, 512), 128)


def test_selector_fields_roundtrip_and_registry():
    from sparselora.selection import DEFAULT_SELECTOR, SAMPLE_ROWS, SELECTORS

    cfg = SparseLoRAConfig(ffn_sparsity={1: 0.5})
    assert cfg.selector == DEFAULT_SELECTOR == "sampled" and cfg.sample_rows == SAMPLE_ROWS
    for name in SELECTORS:  # every registered selector is a valid config value and survives YAML
        c = SparseLoRAConfig(ffn_sparsity={1: 0.5}, selector=name, sample_rows=64)
        assert SparseLoRAConfig.from_yaml(c.to_yaml()) == c
    with pytest.raises(ValueError, match="sampled"):
        SparseLoRAConfig(ffn_sparsity={1: 0.5}, selector="nope")
    assert cfg.score_momentum == 0.5 and SparseLoRAConfig(ffn_sparsity={1: 0.5}, score_momentum=0).score_momentum == 0
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="score_momentum must be in"):
            SparseLoRAConfig(ffn_sparsity={1: 0.5}, score_momentum=bad)
    assert cfg.sample_fp8 is True
    off = SparseLoRAConfig(ffn_sparsity={1: 0.5}, sample_fp8=False)
    assert SparseLoRAConfig.from_yaml(off.to_yaml()) == off
    for bad in ("false", 0, None):  # a YAML "false" in quotes must not read as on
        with pytest.raises(ValueError, match="sample_fp8 must be true or false"):
            SparseLoRAConfig(ffn_sparsity={1: 0.5}, sample_fp8=bad)
