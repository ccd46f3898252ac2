"""Data readers, loss masking, truncation and collation, on tiny files and the real benchmark files."""

import json
from pathlib import Path

import pytest
import torch

from sparselora.data import (
    IGNORE_INDEX,
    DataCollator,
    DataFormatError,
    Example,
    load_examples,
    prompt_ids,
    prompt_text,
    tokenize_examples,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat: bool = True, bos: bool = False):
    """Byte-level tokenizer (one token per byte) built offline; optional BOS prepending, chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", additional_special_tokens=specials[3:]
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- readers


def test_gsm8k_reader(tmp_path):
    p = write_jsonl(
        tmp_path / "g.jsonl",
        [{"question": "Q1?", "answer": "a = <<2*3=6>>6\nso 1,234\n#### 1,234"}, {"question": "Q2?", "answer": "#### -5"}],
    )
    ex = load_examples(p)
    assert [e.answer for e in ex] == ["1234", "-5"]
    assert ex[0].prompt == "Q1?"
    assert ex[0].target == "a = 6\nso 1,234\nThe answer is 1234."
    assert ex[0].meta["line"] == 1 and ex[0].meta["format"] == "gsm8k"
    raw = load_examples(p, clean_gsm8k=False)
    assert raw[0].target.endswith("#### 1,234") and "<<2*3=6>>" in raw[0].target


def test_llm_adapters_and_generic_readers(tmp_path):
    la = tmp_path / "la.json"
    la.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "ctx", "output": "\nA: 5. The answer is 5.", "answer": "5.0"}]))
    (e,) = load_examples(la, fmt="llm_adapters")
    assert (e.prompt, e.target, e.answer) == ("Add 2 and 3.\n\nctx", "A: 5. The answer is 5.", "5.0")

    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    (e,) = load_examples(pc)
    assert (e.prompt, e.target, e.answer) == ("p", "c", None)

    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "last"},
    ]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs, "answer": "x"}])
    (e,) = load_examples(chat)
    assert e.target == "last" and e.prompt == msgs[:4] and e.answer == "x"


def test_malformed_lines_name_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, "{not json", {"prompt": "x"}, {"prompt": "c", "completion": "d"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_examples(p)
    ex = load_examples(p, skip_bad_lines=True)
    assert len(ex) == 2 and ex.n_bad_lines == 2 and [ln for ln, _ in ex.skipped] == [2, 3]
    assert [e.meta["line"] for e in ex] == [1, 4]


def test_format_errors(tmp_path):
    p = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataFormatError, match="Accepted formats: chat: keys messages; gsm8k"):
        load_examples(p)
    with pytest.raises(DataFormatError, match="Unknown data format 'csv'"):
        load_examples(p, fmt="csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no usable examples"):
        load_examples(tmp_path / "empty.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="no usable examples"):
        load_examples(tmp_path / "empty.json")
    with pytest.raises(DataFormatError, match="does not exist"):
        load_examples(tmp_path / "nope.json")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataFormatError, match="line 1: no assistant message"):
        load_examples(chat)


# ----------------------------------------------------------------------------- tokenization


def _decode_parts(tok, feats):
    ids, labels = feats["input_ids"], feats["labels"]
    prompt = [i for i, l in zip(ids, labels) if l == IGNORE_INDEX]
    target = [l for l in labels if l != IGNORE_INDEX]
    return tok.decode(prompt), tok.decode(target)


@pytest.mark.parametrize("chat", [True, False])
def test_labels_mask_prompt_and_target_ends_with_eos(chat):
    tok = tiny_tokenizer(chat=chat, bos=not chat)
    ex = [Example("What is 2+2?", "It is 4."), Example([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], "T")]
    feats, stats = tokenize_examples(ex, tok, max_length=256)
    assert stats.n_kept == 2 and stats.n_dropped == 0 and stats.n_prompt_truncated == 0
    f = feats[0]
    assert len(f["input_ids"]) == len(f["labels"]) == len(f["attention_mask"])
    assert f["labels"][-1] == tok.eos_token_id and f["input_ids"][-1] == tok.eos_token_id
    prompt, target = _decode_parts(tok, f)
    if chat:
        assert prompt == "<|user|>What is 2+2?<|assistant|>"
        assert target == "It is 4.</s>"  # the template's trailing newline is not trained on
        assert _decode_parts(tok, feats[1])[0] == "<|system|>S<|user|>U<|assistant|>"
    else:
        assert f["input_ids"][0] == tok.bos_token_id
        assert prompt == "<s>### Instruction:\nWhat is 2+2?\n\n### Response:\n"
        assert target == "It is 4.</s>"
        assert "### System:\nS" in _decode_parts(tok, feats[1])[0]
    # evaluation builds the very same prompt
    assert prompt_ids(ex[0], tok) == f["input_ids"][: f["labels"].index(next(l for l in f["labels"] if l != IGNORE_INDEX))]
    assert prompt_text(ex[0], tok).endswith("<|assistant|>" if chat else "### Response:\n")


def test_truncation_keeps_answer_and_drops_what_cannot_fit():
    tok = tiny_tokenizer(chat=False, bos=True)
    long_prompt = "x" * 100 + "END"
    ex = [Example(long_prompt, "answer 42"), Example("short", "y" * 80), Example("q", "ok")]
    n_target = len(tok("answer 42", add_special_tokens=False)["input_ids"]) + 1
    feats, stats = tokenize_examples(ex, tok, max_length=60)
    assert stats.n_examples == 3 and stats.n_kept == 2 and stats.n_dropped == 1 and stats.n_prompt_truncated == 1
    f = feats[0]
    assert len(f["input_ids"]) == 60
    assert f["input_ids"][0] == tok.bos_token_id  # BOS survives left truncation
    prompt, target = _decode_parts(tok, f)
    assert target == "answer 42</s>" and sum(l != IGNORE_INDEX for l in f["labels"]) == n_target
    assert prompt.endswith("END\n\n### Response:\n") and "### Instruction" not in prompt
    assert stats.prompt_len["max"] > 100 and stats.target_len["p50"] > 0
    assert "1 dropped (target too long)" in stats.summary()
    with pytest.raises(ValueError, match="All 1 examples were dropped"):
        tokenize_examples([ex[1]], tok, max_length=20)
    with pytest.raises(ValueError, match="empty data set"):
        tokenize_examples([], tok, max_length=20)


def test_empty_targets_are_dropped_and_counted():
    tok = tiny_tokenizer()
    feats, stats = tokenize_examples([Example("a", ""), Example("b", "c")], tok, max_length=64)
    assert len(feats) == 1 and stats.n_empty_target == 1


# ----------------------------------------------------------------------------- collator


def test_collator_pads_right_by_default_and_left_on_request():
    tok = tiny_tokenizer()
    feats, _ = tokenize_examples([Example("a", "b"), Example("longer prompt", "longer target")], tok, max_length=128)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    batch = DataCollator(tok)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, n1) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][0, n0:].eq(IGNORE_INDEX).all() and batch["input_ids"][0, n0:].eq(tok.pad_token_id).all()
    assert batch["labels"][0, :n0].tolist() == feats[0]["labels"]
    left = DataCollator(tok, padding_side="left", pad_to_multiple_of=8)(feats)
    width = (n1 + 7) // 8 * 8
    assert left["input_ids"].shape == (2, width)
    assert left["attention_mask"][0].tolist() == [0] * (width - n0) + [1] * n0
    assert left["input_ids"][0, width - n0 :].tolist() == feats[0]["input_ids"]
    with pytest.raises(ValueError):
        DataCollator(tok, padding_side="middle")


# ----------------------------------------------------------------------------- real files


needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


@needs_data
def test_real_gsm8k_files():
    train = load_examples(SHARED / "gsm8k" / "train.jsonl")
    test = load_examples(SHARED / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (7473, 1319)
    assert all(e.answer.lstrip("-").replace(".", "", 1).isdigit() for e in train)
    assert all(e.target.endswith(f"The answer is {e.answer}.") for e in train)
    assert not any("<<" in e.target or "####" in e.target for e in train)


@needs_data
@pytest.mark.parametrize(
    "name,n,answers",
    [
        ("math/gsm8k_test.json", 1319, None),
        ("math/aqua_test.json", 254, set("ABCDE")),
        ("commonsense/boolq_test.json", 3270, {"true", "false"}),
        ("commonsense/piqa_test.json", 1838, {"solution1", "solution2"}),
        ("commonsense/winogrande_test.json", 1267, {"option1", "option2"}),
    ],
)
def test_real_llm_adapters_files(name, n, answers):
    ex = load_examples(SHARED / name)
    assert len(ex) == n and all(e.answer for e in ex) and all(e.meta["format"] == "instruction" for e in ex)
    if answers:
        assert {e.answer for e in ex} <= answers
    else:
        assert all(float(e.answer) == float(e.answer) for e in ex)


@needs_data
def test_real_commonsense_tokenizes_quickly():
    ex = load_examples(SHARED / "commonsense" / "boolq_train.json", limit=200)
    feats, stats = tokenize_examples(ex, tiny_tokenizer(), max_length=512)
    assert stats.n_kept + stats.n_dropped == 200
    assert all(f["labels"][-1] == 2 for f in feats)
