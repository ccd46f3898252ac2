"""The step benchmark (`sparselora bench`, sparselora/bench/step.py) ships with the package: it runs end to end on
the tiny shape (CPU), writes its JSON outside a checkout into the current folder, runs from a copy of the package
that has no checkout around it, and benchmarks/ keeps its old entry points as re-exports of the package's."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import sparselora
from sparselora.bench import lora, shapes, step, timing
from sparselora.cli.main import main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_step_benchmark_smoke_writes_to_the_current_folder_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shapes, "REPO", tmp_path / "site-packages")  # as installed: no pyproject.toml, no benchmarks/
    monkeypatch.delenv("SPARSELORA_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--shape", "tiny", "--device", "cpu", "--methods", "peft,dense_fast,sparselora,sparselora_graph",
               "--steps", "2", "--warmup", "1", "--rounds", "1", "--estimator-dir", str(tmp_path / "est")])
    assert rc == 0
    rec = json.loads((tmp_path / "step-tiny-math-cpu.json").read_text())
    assert {"gpu", "shape", "batch", "preset", "lora", "timing", "versions", "commit", "methods"} <= set(rec)
    assert rec["commit"] is None and rec["preset"] == "scaled" and rec["batch"]["tokens"] == 2 * 128
    ms = rec["methods"]
    for name in ("peft", "dense_fast", "sparselora"):
        assert "skipped" not in ms[name] and "warning" not in ms[name], (name, ms[name])  # base weights untouched
        assert ms[name]["measured_steps"] == 2 and ms[name]["step_ms"] > 0 and ms[name]["flops_per_step"] > 0
    assert ms["sparselora"]["estimator_ms"] is not None
    # the same adapters (B = 0) on the same base: both dense paths start at the base model's loss
    assert abs(ms["peft"]["first_loss"] - ms["dense_fast"]["first_loss"]) < 1e-2
    assert ms["sparselora"]["flops_per_step"] < ms["dense_fast"]["flops_per_step"]
    if not torch.cuda.is_available():
        assert "CUDA" in ms["sparselora_graph"]["skipped"]
    assert "x peft" in capsys.readouterr().out


def test_results_go_to_the_checkout_when_there_is_one():
    assert shapes.in_checkout()  # the tests run from a source checkout
    assert shapes.results_dir() == shapes.REPO / "benchmarks" / "results"
    assert shapes.paper_preset("llama3-8b", "csr") == shapes.paper_preset("llama3-8b", "commonsense") == "llama3-8b-csr170k"
    assert shapes.paper_preset("tiny", "math") == "scaled"


def test_bench_runs_from_an_installed_copy_without_a_checkout(tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(Path(sparselora.__file__).parent, site / "sparselora",
                    ignore=shutil.ignore_patterns("__pycache__"))
    elsewhere.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        import sparselora.bench.step, sparselora.bench.shapes as shapes
        from sparselora.cli.main import main
        assert Path(sparselora.bench.step.__file__).is_relative_to({str(site)!r}), sparselora.bench.step.__file__
        assert not shapes.in_checkout() and shapes.results_dir() == Path.cwd()
        assert main(["bench", "--help"]) == 0
        assert main(["bench", "--trainer", "--help"]) == 0
        print("ALL OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "--batch-preset" in out.stdout and "--mix" in out.stdout and "ALL OK" in out.stdout
    assert not list(elsewhere.iterdir())  # --help writes nothing


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_benchmark_scripts_use_the_package_helpers():
    common = _load_script("common")
    homes = {"Clock": timing, "cuda_ms": timing, "median": timing, "base_checksum": lora, "cast_lora": lora,
             "shared_lora_model": lora, "QKVO": lora, "ALL_PROJ": lora, "git_commit": shapes, "gpu_slug": shapes,
             "versions": shapes, "SHAPES": shapes, "build_base_model": shapes, "paper_preset": shapes,
             "BATCH_PRESETS": step, "make_batch": step}
    for name, home in homes.items():
        assert getattr(common, name) is getattr(home, name), name  # one home, re-exported
    assert common.REPO == shapes.REPO
    assert _load_script("bench_step").main is step.main


def test_fixed_channels_ablation_selects_once_per_layer(monkeypatch):
    """`sparselora_graph_fixed_channels` prices the selection by removing it: under `FixedChannels.active` each sparse
    layer chooses its channels on its first call only and keeps them; other batches then run on those channels."""
    from helpers import make_batch, tiny_peft

    import sparselora.modules.attention as attention_module
    import sparselora.modules.mlp as mlp_module

    calls = []
    for mod, name in ((mlp_module, "select_ffn"), (attention_module, "select_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = tiny_peft()
    sparselora.apply_sparselora(model, sparselora.SparseLoRAConfig(ffn_sparsity={"1-2": 0.5}, attn_sparsity={2: 0.5},
                                                                   start_step=0))
    fixed = step.FixedChannels()
    kept = []
    with fixed.active():
        for seed in (1, 2, 3):
            model(**make_batch(seed=seed)).loss.backward()
            kept.append(sparselora.kept_channels(model))
    assert sorted(calls) == ["select_attention", "select_ffn", "select_ffn"]  # the first batch only
    assert kept[0].keys() == kept[2].keys() == {1, 2}
    for layer in kept[0]:
        for kind in kept[0][layer]:
            assert torch.equal(kept[0][layer][kind], kept[2][layer][kind])
    calls.clear()
    model(**make_batch(seed=4)).loss.backward()  # outside the ablation: the library selects again
    assert sorted(calls) == ["select_attention", "select_ffn", "select_ffn"]
