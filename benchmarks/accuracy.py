"""Accuracy of LoRA fine-tuning, dense vs SparseLoRA, through the product's own training path.

    python benchmarks/accuracy.py --model qwen2.5-coder-0.5b --task math --data-dir ../shared/data \
        --methods base,dense,sparselora,svd:0,oracle:0 --seeds 0,1 --max-steps 200 --batch-size 16 --test-limit 500

Every trained method is one `sparselora.train.finetune` run (what `sparselora finetune` runs: the Trainer, the
training path it picks on this machine, its sparsity probe), into its own run folder under ``--work-dir``; its
adapter is then loaded onto one shared base with plain PEFT and evaluated with `sparselora.evaluate.evaluate`
(greedy, left padding, large batches). The base weights are checksummed before and after every evaluation.

Methods:
  base        the untrained model (evaluated once)
  dense       `finetune --dense` (plain PEFT LoRA, the same training path and kernels, sparsity off)
  sparselora  `finetune` with its defaults: the model's default sparsity config backed off by the probe until the
              frozen model's loss rises at most ``--loss-bound``, and the library's default selector
  svd, oracle, labelled, random
              the same seed's `sparselora` config (as calibrated) with only the selector changed and no probe: the
              channel choice compared at one sparsity
``name:SEEDS`` overrides ``--seeds`` for one method (``oracle:0``, ``dense:0+1``).

Commonsense trains on one file, the BoolQ + ARC-Easy + ARC-Challenge + OpenBookQA train sets shuffled together
(written once into the work dir), and tests on the six LLM-Adapters test sets.

Resumable: the JSON is rewritten atomically after every (method, seed); a restart with the same settings skips
what is done, and `finetune` resumes an interrupted run from its last checkpoint. ``--deadline SECONDS`` starts
no run that would not finish in time. A failing run is recorded with its error and the script goes on.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_checksum, git_commit, gpu_slug, versions  # noqa: E402
from sparselora.io import atomic_write_json  # noqa: E402
from sparselora.selection import DEFAULT_SELECTOR  # noqa: E402

# the sparselora run's config with another selector; sampled-m0: the default selector without its average over batches
SWAPPED = ("svd", "oracle", "labelled", "random", "sampled-m0")
METHODS = ("base", "dense", "sparselora") + SWAPPED
COMMONSENSE_TRAIN = ("boolq", "arc_easy", "arc_challenge", "openbookqa")
COMMONSENSE_TEST = ("boolq", "piqa", "social_i_qa", "winogrande", "arc_easy", "openbookqa")
TEST_SUBSET_SEED = 12345  # the same test subset for every method and seed
MIX_SEED = 12345  # the order of the commonsense training mix


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------------------------- methods
def parse_methods(spec: str, seeds: list[int]) -> list[tuple[str, list[int]]]:
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, sd = item.partition(":")
        if name not in METHODS:
            raise SystemExit(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        s = [int(x) for x in sd.replace("/", "+").split("+")] if sd else list(seeds)
        out.append((name, s[:1] if name == "base" else s))  # greedy evaluation of the untrained model: one run
    for name, ss in out:
        if name in SWAPPED:
            have = {s for n, sd in out if n == "sparselora" for s in sd}
            missing = [s for s in ss if s not in have]
            if missing:
                raise SystemExit(f"method {name} reuses the sparselora run's config: add sparselora for seeds {missing}")
    return out


def run_order(methods: list[tuple[str, list[int]]]) -> list[tuple[str, int]]:
    """Seed-major (every method's first seed before any second seed, so a cut-short budget still compares),
    and within a seed in the listed order (sparselora before the selectors that reuse its config)."""
    seeds = sorted({s for _, ss in methods for s in ss}, key=lambda s: min(ss.index(s) for _, ss in methods if s in ss))
    order = [(m, s) for s in seeds for m, ss in methods if s in ss]
    return sorted(order, key=lambda ms: (seeds.index(ms[1]), ms[0] in SWAPPED))


# ------------------------------------------------------------------------------------------------ data
def train_file(task: str, data_dir: Path, work: Path) -> Path:
    if task == "math":
        return data_dir / "gsm8k" / "train.jsonl"
    mix = work / "commonsense-train-mix.json"
    if not mix.exists():
        records = []
        for n in COMMONSENSE_TRAIN:
            records.extend(json.loads((data_dir / "commonsense" / f"{n}_train.json").read_text()))
        random.Random(MIX_SEED).shuffle(records)
        atomic_write_json(mix, records)
    return mix


def test_files(task: str, data_dir: Path) -> dict[str, Path]:
    if task == "math":
        return {"gsm8k": data_dir / "gsm8k" / "test.jsonl"}
    return {n: data_dir / "commonsense" / f"{n}_test.json" for n in COMMONSENSE_TEST}


def load_tests(task: str, data_dir: Path, limit: int | None) -> tuple[dict, dict]:
    """{set: examples}, {set: {"n", "n_total", "file", "lines_sha"}}; a limit takes a seeded random subset per set."""
    from sparselora.data import load_examples

    tests, info = {}, {}
    for name, path in test_files(task, data_dir).items():
        ex = load_examples(path)
        n_total = len(ex)
        if limit is not None and limit < n_total:
            idx = sorted(random.Random(f"{TEST_SUBSET_SEED}-{name}").sample(range(n_total), limit))
            ex = [ex[i] for i in idx]
        lines = ",".join(str(e.meta.get("line")) for e in ex)
        tests[name] = ex
        info[name] = {"n": len(ex), "n_total": n_total, "file": str(path.relative_to(path.parents[1])),
                      "lines_sha": hashlib.sha256(lines.encode()).hexdigest()[:16]}
    return tests, info


# ------------------------------------------------------------------------------------------------- runs
def run_config(name: str, seed: int, args, model: str, data: Path, work: Path, recorded: dict | None = None):
    """The `RunConfig` of one trained (method, seed): the finetune defaults except the protocol's settings.
    ``recorded``: the table's record of that seed's sparselora run, whose calibrated config a swapped selector
    takes when the run folder is gone (a table resumed on another machine)."""
    from sparselora import SparseLoRAConfig
    from sparselora.train import RunConfig

    common = dict(model=model, data=str(data), output=str(work / f"{name}-s{seed}"), seed=seed,
                  max_steps=args.max_steps or -1, epochs=args.epochs, batch_size=args.batch_size,
                  learning_rate=args.lr, max_length=args.max_length, lora_dropout=args.lora_dropout,
                  heldout=args.heldout, save_steps=args.save_steps, save_total_limit=1,
                  estimator_dir=args.estimator_dir,
                  logging_steps=1)  # every step's loss, as the tables made before finetune's GPU default of 10
    if name == "dense":
        return RunConfig(dense=True, sparsity=args.sparsity, loss_bound=None, **common)
    if name == "sparselora":
        return RunConfig(sparsity=args.sparsity, loss_bound=args.loss_bound, probe=args.probe,
                         kl_bound=args.kl_bound, **common)
    # a swapped selector: the same seed's calibrated sparselora config, only the selector changed, no probe
    calibrated = work / f"sparselora-s{seed}" / "sparsity.yaml"
    if calibrated.exists():
        cfg = SparseLoRAConfig.from_yaml(calibrated)
    elif recorded and recorded.get("sparsity_config"):
        cfg = SparseLoRAConfig(**recorded["sparsity_config"])
    else:
        raise RuntimeError(f"{calibrated} missing and the table records no sparselora run of seed {seed}: that run "
                           "must run first")
    if name == "sampled-m0":
        cfg.selector, cfg.score_momentum = "sampled", 0.0
    else:
        cfg.selector = name
    path = work / f"{name}-s{seed}.sparsity.yaml"
    cfg.to_yaml(path)
    return RunConfig(sparsity=str(path), loss_bound=None, **common)


def train(name: str, seed: int, args, model: str, data: Path, work: Path, recorded: dict | None = None) -> dict:
    """One finetune run (resumed if a previous call was cut short; reused if finished)."""
    from sparselora.run.folder import is_run_dir
    from sparselora.train import finetune

    cfg = run_config(name, seed, args, model, data, work, recorded)
    resume = is_run_dir(Path(cfg.output))
    summary = finetune(cfg, resume=resume, progress=False, label=f"{name} s{seed}", echo=lambda s: log("  " + s))
    fl = summary["flops"]
    dense_mode = summary["mode"] == "dense"
    steps = summary["steps"]
    w = 0.0 if dense_mode else dense_warmup_steps(summary) / max(1, steps)  # the first steps run dense
    ratio = 1.0 if dense_mode else fl["sparse"] / fl["dense"]
    losses = [x["loss"] for x in summary["losses"]]
    k = max(1, len(losses) // 10)
    return {
        "run_dir": summary["output"], "steps": steps, "training_path": summary["training_path"]["description"],
        "data": summary["data"], "calibration": summary["calibration"], "sparsity_config": summary["sparsity_config"],
        "flops": {"dense_per_step": fl["dense"], "sparse_per_step": fl["dense"] if dense_mode else fl["sparse"],
                  "ratio": ratio, "ratio_incl_warmup": w + (1 - w) * ratio, "batch_shape": fl["batch_shape"],
                  "labelled_per_row": fl["labelled_per_row"]},
        "train_seconds": summary["wall_seconds"], "median_step_seconds": summary["median_step_seconds"],
        "tokens_per_second": summary["tokens_per_second"], "loss_curve": losses,
        "first_loss": losses[0] if losses else None, "final_loss": statistics.fmean(losses[-k:]) if losses else None,
        "heldout_dense_loss": (summary.get("heldout") or {}).get("dense_loss"),
    }


def dense_warmup_steps(summary: dict) -> int:
    """Steps that ran dense before sparsity switched on (the progressive start), from the per-step records."""
    return sum(1 for s in summary.get("step_times", []) if not s.get("sparse"))


def evaluate_all(model, tokenizer, tests, task, args, pred_dir: Path | None) -> dict:
    from sparselora.evaluate import evaluate

    res = {}
    for name, ex in tests.items():
        s = evaluate(model, tokenizer, ex, task=task, batch_size=args.eval_batch_size,
                     max_new_tokens=args.max_new_tokens, out_dir=pred_dir, name=name)
        res[name] = {k: s[k] for k in ("accuracy", "n", "correct", "ci95", "n_unparsed", "seconds", "hits")}
        log(f"  {name}: {s['accuracy']:.4f} (n={s['n']}, unparsed {s['n_unparsed']}, {s['seconds']:.1f}s)")
    return res


def one_run(name: str, seed: int, ctx: dict) -> dict:
    from peft import PeftModel

    args = ctx["args"]
    rec = {"seed": seed, "settings_hash": ctx["settings_hash"], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "commit": git_commit()}  # the file's "commit" is its last writer's; a resumed table can span commits
    pred_dir = ctx["pred_root"] / f"{name}-s{seed}" if ctx["pred_root"] else None
    t0 = time.perf_counter()
    if name == "base":
        rec["eval"] = evaluate_all(ctx["base"], ctx["tokenizer"], ctx["tests"], args.task, args, pred_dir)
    else:
        recorded = ctx["doc"]["methods"].get("sparselora", {}).get("runs", {}).get(str(seed))
        if recorded is not None and (recorded.get("settings_hash") != ctx["settings_hash"] or "error" in recorded):
            recorded = None  # only a finished run of these settings
        rec.update(train(name, seed, args, ctx["model"], ctx["data"], ctx["work"], recorded))
        log(f"  trained {rec['steps']} steps in {rec['train_seconds']:.0f}s ({rec['training_path']}); loss "
            f"{rec['first_loss']:.3f} -> {rec['final_loss']:.3f}; FLOPs {rec['flops']['ratio']:.1%} of dense")
        gc.collect()  # the run's own model copy goes before the adapter is loaded onto the shared base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = PeftModel.from_pretrained(ctx["base"], str(Path(rec["run_dir"]) / "adapter"))
        try:
            rec["eval"] = evaluate_all(model, ctx["tokenizer"], ctx["tests"], args.task, args, pred_dir)
        finally:
            ctx["base"] = model.unload()  # the plain base again, for the next run
    rec["seconds_total"] = time.perf_counter() - t0
    return rec


def paired_difference(runs: list[dict], ref_runs: list[dict], sets: list[str]) -> dict | None:
    """The task average of ``runs`` minus that of ``ref_runs`` (each averaged over its seeds), in points, with a
    95% interval from the per-example differences on the same test examples (a paired comparison: most of the
    between-model noise of two unpaired accuracies is which examples the subset holds, and it cancels here).
    Per example, the difference of the two methods' hit rates over their seeds; a set's difference is their mean,
    its variance that of the mean; the task average weighs the sets equally. None without per-example hits."""
    per_set, var = {}, 0.0
    for s in sets:
        hits = [[r["eval"][s].get("hits") for r in rs] for rs in (runs, ref_runs)]
        if not all(h for side in hits for h in side) or len({len(h) for side in hits for h in side}) != 1:
            return None
        n = len(hits[0][0])
        rate = [[statistics.fmean(int(h[i]) for h in side) for i in range(n)] for side in hits]
        d = [a - b for a, b in zip(*rate)]
        per_set[s] = 100 * statistics.fmean(d)
        var += statistics.pvariance(d) / (n - 1) if n > 1 else 0.0  # of the set's mean difference
    diff, half = statistics.fmean(per_set.values()), 100 * 1.96 * var ** 0.5 / len(sets)
    return {"points": round(diff, 2), "ci95": [round(diff - half, 2), round(diff + half, 2)],
            "per_set": {s: round(v, 2) for s, v in per_set.items()}, "seeds": [len(runs), len(ref_runs)]}


def aggregate(doc: dict) -> None:
    """Per method: the lists the report reads, in seed order, from the successful runs; against dense, the paired
    difference on the same test examples (`paired_difference`)."""
    dense_runs = [r for r in doc["methods"].get("dense", {}).get("runs", {}).values() if "eval" in r]
    for name, m in doc["methods"].items():
        runs = [r for _, r in sorted(m.get("runs", {}).items(), key=lambda kv: int(kv[0])) if "eval" in r]
        m["seeds"] = [r["seed"] for r in runs]
        sets = list(runs[0]["eval"]) if runs else []
        m["accuracy"] = {s: [r["eval"][s]["accuracy"] for r in runs] for s in sets}
        if sets:
            m["average"] = [statistics.fmean(r["eval"][s]["accuracy"] for s in sets) for r in runs]
            if name != "dense" and dense_runs and set(dense_runs[0]["eval"]) == set(sets):
                m["paired_vs_dense"] = paired_difference(runs, dense_runs, sets)
        m["eval_seconds"] = [sum(r["eval"][s]["seconds"] for s in sets) for r in runs]
        if runs and "flops" in runs[0]:
            m["flops_per_step"] = statistics.fmean(r["flops"]["sparse_per_step"] for r in runs)
            m["flops_dense_per_step"] = statistics.fmean(r["flops"]["dense_per_step"] for r in runs)
            m["flops_ratio"] = m["flops_per_step"] / m["flops_dense_per_step"]
            m["flops_ratio_incl_warmup"] = statistics.fmean(r["flops"].get("ratio_incl_warmup", r["flops"]["ratio"])
                                                            for r in runs)
            m["train_seconds"] = [r["train_seconds"] for r in runs]
            m["final_loss"] = [r["final_loss"] for r in runs]
            m["heldout_dense_loss"] = [r.get("heldout_dense_loss") for r in runs]
            m["loss_curve"] = [r["loss_curve"] for r in runs]
            cal = [r.get("calibration") for r in runs]
            if any(cal):
                m["probe"] = cal
        errors = {k: r["error"] for k, r in m.get("runs", {}).items() if "error" in r}
        if errors:
            m["errors"] = errors
        else:
            m.pop("errors", None)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, GGUF file or alias (smollm2-135m, qwen2.5-coder-0.5b)")
    p.add_argument("--task", required=True, choices=["math", "commonsense"])
    p.add_argument("--methods", default="base,dense,sparselora,svd:0,oracle:0",
                   help="comma list; 'name:0' or 'name:0+1' overrides --seeds for that method")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=None, help="default benchmarks/results/accuracy-<model>-<task>.json")
    p.add_argument("--work-dir", default=None, help="run folders (default: <out without .json>.runs/)")
    p.add_argument("--pred-dir", default=None, help="predictions per run (default: <out without .json>.preds/); 'none' to skip")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="used when --max-steps is not given")
    p.add_argument("--test-limit", type=int, default=None, help="seeded random subset of N examples per test set")
    p.add_argument("--sparsity", default=None, help="a preset name or YAML (default: the finetune default for the model)")
    p.add_argument("--loss-bound", type=float, default=0.05, help="the sparsity probe's bound (finetune's --loss-bound)")
    p.add_argument("--probe", choices=("loss", "kl"), default=None,
                   help="the sparsity probe's criterion (default: finetune's --probe); tables made before it existed "
                        "used loss")
    p.add_argument("--kl-bound", type=float, default=None,
                   help="the bound of --probe kl, nats (default: finetune's --kl-bound)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-dropout", type=float, default=0.05, help="finetune's default")
    p.add_argument("--heldout", type=int, default=128, help="training examples held out; their dense loss is recorded")
    p.add_argument("--save-steps", type=int, default=100, help="checkpoint interval (what a cut-short call resumes from)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (math), 32 (commonsense)")
    p.add_argument("--estimator-dir", default=None, help="default: finetune's (~/.cache/sparselora/estimators)")
    p.add_argument("--deadline", type=float, default=None, help="seconds: start no run that would end after this")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.task == "math" else 32
    from sparselora.train import RunConfig

    for name in ("estimator_dir", "probe", "kl_bound"):  # finetune's defaults, from one place
        if getattr(args, name) is None:
            setattr(args, name, getattr(RunConfig(), name))
    return args


def model_slug(model: str) -> str:
    name = Path(model).name if os.path.exists(model) else model
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name.lower()).strip("-") or "model"


SETTING_KEYS = ("task", "max_steps", "epochs", "test_limit", "sparsity", "loss_bound", "batch_size", "max_length",
                "lr", "lora_dropout", "heldout", "max_new_tokens")


def settings(args, test_info) -> dict:
    s = {k: getattr(args, k) for k in SETTING_KEYS}
    if args.probe != "loss":  # added later: tables made with the loss probe (--probe loss) keep their settings hash
        s.update(probe=args.probe, kl_bound=args.kl_bound)
    s["tests"] = {k: v["lines_sha"] for k, v in test_info.items()}
    return s


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = run_order(parse_methods(args.methods, seeds))
    data_dir = Path(args.data_dir).expanduser()
    slug = model_slug(args.model)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"accuracy-{slug}-{args.task}.json"
    work = Path(args.work_dir) if args.work_dir else Path(out.with_suffix("").as_posix() + ".runs")
    work.mkdir(parents=True, exist_ok=True)

    from sparselora.loading import load_model, resolve_model

    folder = resolve_model(args.model)
    tests, test_info = load_tests(args.task, data_dir, args.test_limit)
    data = train_file(args.task, data_dir, work)
    sett = settings(args, test_info)
    sh = hashlib.sha256(json.dumps(sett, sort_keys=True).encode()).hexdigest()[:16]
    doc = None
    if out.exists():
        doc = json.loads(out.read_text())
        if doc.get("config", {}).get("settings_hash") != sh:
            bak = out.with_name(out.name + f".bak-{doc.get('config', {}).get('settings_hash', 'old')}")
            os.replace(out, bak)
            log(f"{out} was made with other settings; moved to {bak.name}, starting afresh")
            doc = None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    base, tokenizer = load_model(folder, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                 device=device)
    base.requires_grad_(False)
    checksum = base_checksum(base)
    log(f"loaded {folder} on {device} in {time.perf_counter() - t0:.1f}s; base checksum {checksum}")

    if doc is None:
        doc = {"model": slug, "model_path": str(args.model), "task": args.task, "methods": {}}
    doc.update({
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpu_slug": gpu_slug(device), "versions": versions(), "commit": git_commit(),
        "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "default_selector": DEFAULT_SELECTOR,
        "config": {**sett, "settings_hash": sh, "seeds": seeds, "methods": args.methods,
                   "training": "sparselora.train.finetune (the `sparselora finetune` runner), one run folder per "
                               "(method, seed); the finetune defaults except the settings above",
                   "train_file": str(data.relative_to(data_dir)) if data.is_relative_to(data_dir) else
                   f"{data.name} (" + " + ".join(f"commonsense/{n}_train.json" for n in COMMONSENSE_TRAIN)
                   + f", shuffled with seed {MIX_SEED})",
                   "tests": test_info, "base_checksum": checksum, "eval_batch_size": args.eval_batch_size},
    })
    ctx = {"args": args, "base": base, "tokenizer": tokenizer, "tests": tests, "settings_hash": sh,
           "model": str(folder), "data": data, "work": work, "doc": doc,
           "pred_root": None if args.pred_dir == "none" else Path(args.pred_dir or out.with_suffix("").as_posix() + ".preds")}
    durations = []
    for name, seed in runs:
        m = doc["methods"].setdefault(name, {"runs": {}})
        prev = m["runs"].get(str(seed))
        if prev and "error" not in prev and prev.get("settings_hash") == sh:
            log(f"{name} seed {seed}: done before, skipped")
            continue
        elapsed = time.perf_counter() - t_start
        guess = max(durations) if durations else 0.0
        if args.deadline and elapsed + guess > args.deadline:
            log(f"{name} seed {seed}: not started ({elapsed:.0f}s elapsed + ~{guess:.0f}s > deadline {args.deadline:.0f}s)")
            continue
        log(f"== {name} seed {seed}")
        t0 = time.perf_counter()
        try:
            rec = one_run(name, seed, ctx)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next method still runs
            rec = {"seed": seed, "settings_hash": sh, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]}
            log(f"  FAILED: {rec['error']}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        durations.append(time.perf_counter() - t0)
        after = base_checksum(ctx["base"])
        if after != checksum:
            rec["error"] = (rec.get("error", "") + f" base weights changed ({checksum} -> {after})").strip()
        m["runs"][str(seed)] = rec
        doc["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        aggregate(doc)
        atomic_write_json(out, doc)
        if after != checksum:
            log("base weights changed: aborting")
            return 2
    aggregate(doc)
    atomic_write_json(out, doc)
    log(f"wrote {out} in {time.perf_counter() - t_start:.0f}s")
    print_summary(doc)
    return 0


def print_summary(doc):
    print(f"\n{doc['model']} {doc['task']}  ({doc['gpu']})")
    for name, m in doc["methods"].items():
        avg = m.get("average") or []
        acc = " ".join(f"{s}={statistics.fmean(v):.3f}" for s, v in m.get("accuracy", {}).items() if v)
        fl = f"{m['flops_ratio']:.1%}" if "flops_ratio" in m else "-"
        ts = f"{statistics.fmean(m['train_seconds']):.1f}s" if m.get("train_seconds") else "-"
        print(f"  {name:<12} avg {statistics.fmean(avg) if avg else float('nan'):.4f} seeds {m.get('seeds')} "
              f"FLOPs {fl} train {ts}  {acc}" + ("  ERRORS" if m.get("errors") else ""))


if __name__ == "__main__":
    sys.exit(main())
