"""Smoke checks of benchmarks/accuracy.py and make_results_md.py pieces that need no model (fast, CPU)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


acc = _load("accuracy")
md = _load("make_results_md")


def test_methods_and_order():
    m = acc.parse_methods("base,dense,sparselora,oracle:0,sparselora_all7:1", [0, 1])
    assert m == [("base", [0]), ("dense", [0, 1]), ("sparselora", [0, 1]), ("oracle", [0]), ("sparselora_all7", [1])]
    order = acc.run_order(m)
    assert order[:4] == [("base", 0), ("dense", 0), ("sparselora", 0), ("oracle", 0)]
    assert set(order[4:]) == {("dense", 1), ("sparselora", 1), ("sparselora_all7", 1)}
    assert acc.method_info("dense_all7")["targets"] == list(acc.ALL7)
    with pytest.raises(SystemExit):
        acc.parse_methods("lora", [0])


def test_choose_scaled_and_lr():
    grid = [{"ffn": f, "attn": 0.0, "ratio": r} for f, r in ((0.5, 0.9), (0.9, 0.6), (0.99, 0.5))]
    assert acc.choose_scaled(grid, 0.55, 0.03) == (grid[2], True)
    pick, met = acc.choose_scaled(grid, 0.4, 0.15)
    assert not met and pick is grid[1]  # least aggressive within the slack of the floor
    f, warm = acc.lr_lambda(100, 0.04)
    assert warm == 4 and f(0) == pytest.approx(0.25) and f(4) == pytest.approx(1.0) and f(99) < 0.01


def test_aggregate_and_markdown(tmp_path):
    run = lambda a, s: {"seed": s, "eval": {"gsm8k": {"accuracy": a, "seconds": 1.0}},  # noqa: E731
                        "flops": {"sparse_per_step": 6.0, "dense_per_step": 10.0}, "train_seconds": 2.0,
                        "step_ms_median": 1.0, "final_loss": 0.5, "loss_curve": [1.0, 0.5]}
    doc = {"model": "m", "task": "math", "gpu": "cpu", "config": {"tests": {"gsm8k": {"n": 2, "n_total": 2}}},
           "methods": {"dense": {"runs": {"0": run(0.5, 0), "1": run(0.6, 1)}},
                       "sparselora": {"runs": {"0": run(0.5, 0), "1": {"seed": 1, "error": "boom"}}}}}
    acc.aggregate(doc)
    assert doc["methods"]["dense"]["accuracy"]["gsm8k"] == [0.5, 0.6]
    assert doc["methods"]["sparselora"]["seeds"] == [0] and "1" in doc["methods"]["sparselora"]["errors"]
    assert doc["methods"]["sparselora"]["flops_ratio"] == pytest.approx(0.6)
    (tmp_path / "accuracy-m-math.json").write_text(json.dumps(doc))
    out = tmp_path / "results.md"
    md.main(["--results", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "| dense | 0,1 | 55.0 ± 5.0 |" in text and "NOT met" in text and "Not yet run" in text
