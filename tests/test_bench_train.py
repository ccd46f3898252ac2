"""The Trainer benchmark end to end on the tiny shape (CPU): every method it names runs, the JSON has the
documented shape, the packed methods see the same real tokens per step as the padded ones."""

from __future__ import annotations

import json

import pytest

from sparselora.bench.train import load_lengths, make_examples
from sparselora.cli.main import main


def test_lengths_are_real_and_shipped():
    for mix in ("math", "commonsense", "code"):
        d = load_lengths(mix)
        assert d["count"] == len(d["prompt"]) == len(d["answer"]) > 100
        assert min(d["prompt"]) > 0 and min(d["answer"]) > 0 and d["tokenizer"]
    ex = make_examples(load_lengths("math"), 5, vocab=50, seed=0)
    assert all(len(e["input_ids"]) == len(e["labels"]) for e in ex)


def test_bench_trainer_smoke(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "--trainer", "--shape", "tiny", "--mix", "code", "--methods",
               "peft,sparselora_trainer,sparselora_fast,sparselora_fast@svd,dense_graph_packed", "--steps", "2",
               "--warmup", "1",
               "--tokens-per-step", "512", "--scratch", str(tmp_path / "s"), "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert {"gpu", "shape", "mix", "preset", "versions", "commit", "methods", "flops"} <= set(rec)
    for name, m in rec["methods"].items():
        assert "error" not in m, (name, m)
        assert {"kind", "tokens_per_s", "step_ms", "mean_step_ms", "peak_gib", "captures", "batching"} <= set(m)
        assert m["tokens_per_s"] > 0 and m["steps_measured"] == 2
    assert rec["methods"]["sparselora_fast"]["kind"] == "sparse" and rec["methods"]["peft"]["kind"] == "dense"
    # the preset's selector is the library default; method@selector runs the same method with another one
    assert rec["methods"]["sparselora_fast"]["selector"] == "sampled"
    assert rec["methods"]["sparselora_fast@svd"]["selector"] == "svd" and rec["methods"]["peft"]["selector"] is None
    # the share of real tokens that took the sparse path: all the context with exact counts (the plain Trainer),
    # at most all of it bucketed (the graphed path), never nothing
    m = rec["methods"]
    assert m["sparselora_trainer"]["sparse_row_fraction"] == pytest.approx(m["sparselora_trainer"]["context_fraction"])
    assert 0 < m["sparselora_fast"]["sparse_row_fraction"] <= m["sparselora_fast"]["context_fraction"]
    assert "sparse_row_fraction" not in rec["methods"]["peft"]
    out_text = capsys.readouterr().out
    assert "vs best dense" in out_text and "took the sparse path" in out_text


def test_bench_exit_code_when_the_benchmark_returns_its_record(monkeypatch):
    """`sparselora bench` used to exit 1 ("int() argument ... not 'dict'") after a successful run (issue 12 item 11)."""
    from sparselora.bench import step

    monkeypatch.setattr(step, "main", lambda argv: {"methods": {}, "argv": argv})  # what the step benchmark returns
    assert main(["bench", "--shape", "tiny"]) == 0
    monkeypatch.setattr(step, "main", lambda argv: 3)
    assert main(["bench"]) == 3


def test_bench_trainer_refuses_a_selector_on_a_dense_method(tmp_path, capsys):
    for bad in ("peft@svd", "sparselora_fast@nope"):
        assert main(["bench", "--trainer", "--shape", "tiny", "--methods", bad, "--scratch", str(tmp_path)]) == 2
        assert "'@selector' takes a sparse method" in capsys.readouterr().err  # the reason is printed, not lost
