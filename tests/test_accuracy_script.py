"""Smoke checks of benchmarks/accuracy.py and make_results_md.py pieces that need no model (fast, CPU)."""

import importlib.util
import json
import statistics
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
    m = acc.parse_methods("base,dense,oracle:1,sparselora,svd:0", [0, 1])
    assert m == [("base", [0]), ("dense", [0, 1]), ("oracle", [1]), ("sparselora", [0, 1]), ("svd", [0])]
    order = acc.run_order(m)
    # seed-major, and a swapped selector after the sparselora run whose calibrated config it reuses
    assert order == [("base", 0), ("dense", 0), ("sparselora", 0), ("svd", 0),
                     ("dense", 1), ("sparselora", 1), ("oracle", 1)]
    with pytest.raises(SystemExit):
        acc.parse_methods("lora", [0])
    with pytest.raises(SystemExit, match="add sparselora"):
        acc.parse_methods("dense,svd", [0])
    from sparselora.selection import SELECTORS

    assert set(acc.SWAPPED) - {"sampled-m0"} <= set(SELECTORS)  # every other swapped method is a library selector


def test_swapped_selector_reuses_the_calibrated_config(tmp_path):
    from sparselora import SparseLoRAConfig

    args = acc.parse_args(["--model", "m", "--task", "math", "--max-steps", "3"])
    with pytest.raises(RuntimeError, match="must run first"):
        acc.run_config("oracle", 0, args, "m", tmp_path / "d.jsonl", tmp_path)
    (tmp_path / "sparselora-s0").mkdir()
    SparseLoRAConfig(ffn_sparsity={"2-5": 0.3}, selector="sampled").to_yaml(tmp_path / "sparselora-s0" / "sparsity.yaml")
    cfg = acc.run_config("oracle", 0, args, "m", tmp_path / "d.jsonl", tmp_path)
    used = SparseLoRAConfig.from_yaml(cfg.sparsity)
    assert used.selector == "oracle" and used.ffn_sparsity == {2: 0.3, 3: 0.3, 4: 0.3, 5: 0.3} and cfg.loss_bound is None
    m0 = SparseLoRAConfig.from_yaml(acc.run_config("sampled-m0", 0, args, "m", tmp_path / "d.jsonl", tmp_path).sparsity)
    assert m0.selector == "sampled" and m0.score_momentum == 0 and m0.ffn_sparsity == used.ffn_sparsity
    dense = acc.run_config("dense", 1, args, "m", tmp_path / "d.jsonl", tmp_path)
    assert dense.dense and dense.seed == 1 and dense.max_steps == 3 and dense.output.endswith("dense-s1")
    assert dense.logging_steps == 1  # every step's loss, as the earlier tables


def test_swapped_selector_takes_the_tables_record_when_the_run_folder_is_gone(tmp_path):
    """A table resumed on a fresh machine: the seed's sparselora run folder is gone, its JSON record is not."""
    from sparselora import SparseLoRAConfig

    args = acc.parse_args(["--model", "m", "--task", "math", "--max-steps", "3"])
    recorded = {"sparsity_config": {"ffn_sparsity": {"3-4": 0.63}, "attn_sparsity": {"4": 0.35}, "selector": "sampled",
                                    "sample_rows": 256, "start_step": 0.05}}
    cfg = acc.run_config("svd", 0, args, "m", tmp_path / "d.jsonl", tmp_path, recorded)
    used = SparseLoRAConfig.from_yaml(cfg.sparsity)
    assert used.selector == "svd" and used.ffn_sparsity == {3: 0.63, 4: 0.63} and used.attn_sparsity == {4: 0.35}
    assert used.start_step == 0.05 and cfg.loss_bound is None


def test_aggregate_and_markdown(tmp_path):
    run = lambda a, s: {"seed": s, "eval": {"gsm8k": {"accuracy": a, "seconds": 1.0}},  # noqa: E731
                        "flops": {"sparse_per_step": 6.0, "dense_per_step": 10.0, "ratio": 0.6}, "train_seconds": 2.0,
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


def test_paired_difference_on_the_same_examples():
    """The paired difference of two methods' task averages, from per-example hits: the point estimate equals the
    difference of the mean accuracies, the interval comes from the per-example differences (checked by hand on a
    small case), it narrows when the two methods err on the same examples, and runs without hits give None."""
    def run(hits):
        return {"eval": {k: {"hits": h, "accuracy": h.count("1") / len(h)} for k, h in hits.items()}}

    a = [run({"x": "1100", "y": "10"}), run({"x": "1110", "y": "11"})]
    b = [run({"x": "1000", "y": "00"})]
    p = acc.paired_difference(a, b, ["x", "y"])
    # per example: x: (1-1, 1-0, .5-0, 0-0) -> mean .375; y: (1-0, .5-0) -> .75; average .5625
    assert p["per_set"] == {"x": 37.5, "y": 75.0} and p["points"] == pytest.approx(56.25, abs=0.01)
    var_x = statistics.pvariance([0, 1, 0.5, 0]) / 3
    var_y = statistics.pvariance([1, 0.5]) / 1
    half = 100 * 1.96 * (var_x + var_y) ** 0.5 / 2
    assert p["ci95"] == pytest.approx([56.25 - half, 56.25 + half], abs=0.01)
    same = acc.paired_difference([run({"x": "1111000000"})], [run({"x": "1110000000"})], ["x"])
    shuffled = acc.paired_difference([run({"x": "0000001111"})], [run({"x": "1110000000"})], ["x"])
    assert same["points"] == shuffled["points"] == 10.0
    assert same["ci95"][1] - same["ci95"][0] < shuffled["ci95"][1] - shuffled["ci95"][0]
    assert acc.paired_difference([{"eval": {"x": {"accuracy": 0.5}}}], b, ["x"]) is None


def test_paired_note_in_the_goal_line():
    note = md.paired_note({"paired_vs_dense": {"points": -1.2, "ci95": [-2.5, 0.1]}})
    assert "-1.20 points" in note and "undecided" in note
    assert "short of" in md.paired_note({"paired_vs_dense": {"points": -3.0, "ci95": [-4.0, -2.0]}})
    assert "within" in md.paired_note({"paired_vs_dense": {"points": 0.4, "ci95": [-0.3, 1.1]}})
    assert md.paired_note({}) == ""
