"""Answer extraction edge cases, Wilson intervals, and a generation smoke test on a tiny random llama."""

import json

import pytest
import torch

from sparselora.data import Example
from sparselora.evaluate import (
    evaluate,
    extract_choice,
    extract_label,
    extract_number,
    generate,
    is_correct,
    label_set_for,
    parse_number,
    wilson_interval,
)
from sparselora.evaluate import runner


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She pays 3 * 4 = 12 dollars. The answer is 12.", 12),
        ("Total is 1,234 apples", 1234),
        ("It costs $5.", 5),
        ("The answer is $1,000,000.50 in total", 1000000.5),
        ("Temperature drops to -7 degrees", -7),
        ("10-3 = 7", 7),
        ("She ate 3/4 of the pie", 0.75),
        ("The answer is 3/4. Check: 4 slices", 0.75),  # marker wins over the last number
        ("#### 72", 72),
        ("so x = .5", 0.5),
        ("Answer: 42\nThere were 3 steps", 42),
        ("Numbers 1, 2, 3", 3),
        ("The result is 18.0", 18),
        ("no digits here", None),
        ("", None),
        ("The answer is unclear, maybe 17", 17),
        ("1 \u2212 9 = \u22128", -8),
    ],
)
def test_extract_number(text, expected):
    got = extract_number(text)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_parse_gold_and_tolerance():
    assert parse_number("576.0") == 576 and parse_number("1,234") == 1234 and parse_number("-3") == -3
    assert parse_number("0.16666666666666666") == pytest.approx(1 / 6)
    assert is_correct(576.0, "576.0", "math") and is_correct(1 / 6, "0.1667", "math")
    assert not is_correct(0.17, "0.16666666666666666", "math")
    assert is_correct(0.1666, "0.16666666666666666", "math")
    assert not is_correct(None, "3", "math") and not is_correct(float("nan"), "3", "math")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is (D).", "D"),
        ("Answer: C", "C"),
        ("So we get 12. Option (B) fits, the answer is E", "E"),
        ("A train leaves at 5. Hence (C)", "C"),
        ("A train leaves, so B is right", "B"),
        ("I think it's 23.65", None),
        ("the answer is a lot", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_commonsense_labels_follow_gold_form():
    assert label_set_for("true") == ("true", "false")
    assert label_set_for("solution2") == ("solution1", "solution2")
    assert label_set_for("answer3")[-1] == "answer5"
    assert label_set_for("option1") == ("option1", "option2")
    assert label_set_for("ending4")[0] == "ending1"
    assert "true" in label_set_for("weird")
    assert extract_label("the correct answer is answer3", label_set_for("answer1")) == "answer3"
    assert extract_label("The correct answer is True.", label_set_for("false")) == "true"
    assert extract_label("solution1 is wrong, solution2", label_set_for("solution2")) == "solution1"  # first wins
    assert extract_label("untrue answer", label_set_for("true")) is None
    assert extract_label("answer6", label_set_for("answer1")) is None


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_scoring_and_outputs_with_scripted_completions(tmp_path, monkeypatch):
    completions = ["The answer is 1,234.", "I get 7", "the correct answer is false", "(B)"]
    monkeypatch.setattr(runner, "generate", lambda model, tok, prompts, *a, **k: completions[: len(prompts)])
    tok = _tiny_tokenizer()
    model = torch.nn.Linear(1, 1)
    math_ex = [Example("q1", "", "1234"), Example("q2", "", "8")]
    s = evaluate(model, tok, math_ex, task="math", out_dir=tmp_path, name="gsm8k")
    assert (s["n"], s["correct"], s["accuracy"]) == (2, 1, 0.5)
    assert s["ci95"][0] < 0.5 < s["ci95"][1]
    rows = [json.loads(l) for l in (tmp_path / "gsm8k.predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False] and rows[0]["prediction"] == 1234
    assert json.loads((tmp_path / "gsm8k.scores.json").read_text())["correct"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(ValueError, match="no gold answer"):
        evaluate(model, tok, [Example("q", "t")], task="math")
    with pytest.raises(ValueError, match="Unknown task"):
        evaluate(model, tok, math_ex, task="poetry")
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tok, [], task="math")


# ----------------------------------------------------------------------------- tiny model smoke test


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_model(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def test_generation_smoke_batched_equals_unbatched(tmp_path):
    tok = _tiny_tokenizer()
    model = _tiny_model(len(tok))
    ex = [
        Example("What is 1+1?", "2", "2"),
        Example("A much longer question about apples and pears?", "3", "3"),
        Example("Hi", "4", "4"),
    ]
    from sparselora.data import prompt_ids

    prompts = [prompt_ids(e, tok) for e in ex]
    one = generate(model, tok, prompts, batch_size=1, max_new_tokens=6)
    many = generate(model, tok, prompts, batch_size=3, max_new_tokens=6)
    assert one == many and all(isinstance(c, str) for c in one)
    model.train()
    s = evaluate(model, tok, ex, task="math", batch_size=2, max_new_tokens=6, out_dir=tmp_path)
    assert model.training  # mode restored
    assert s["n"] == 3 and 0 <= s["accuracy"] <= 1 and s["max_new_tokens"] == 6 and s["chat_template"] is False
    assert len((tmp_path / "math.predictions.jsonl").read_text().splitlines()) == 3
