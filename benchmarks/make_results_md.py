"""Write docs/results.md from benchmarks/results/accuracy-*.json and recall-*.json.

    python benchmarks/make_results_md.py                      # reads benchmarks/results/, writes docs/results.md
    python benchmarks/make_results_md.py --results DIR --out FILE

Accuracy: one table per model/task; rows are methods, columns each test set and the average (mean over seeds
± half the spread max-min, in points), FLOPs per step as % of dense, training seconds per run. Then the
command that reproduces the table, the GPU, versions, commit, and the gap to the goal (SparseLoRA within 0.5
points of dense on the task average at <= 55% of dense FLOPs). Selectors: mass and recall vs the oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_POINTS = 0.5
GOAL_RATIO = {"math": 0.80, "commonsense": 0.55}  # GSM8K: half its tokens are labelled answers (floor ~69%)
ORDER = ["base", "dense", "sparselora", "sampled-m0", "svd", "oracle", "labelled", "random"]
# How the tables were made on one H200: the model file reassembled there (see ../shared/data/README.md for the
# package parts; sparselora converts it once to a bf16 folder), the data copied to /root/xfer/data.
GPU_COMMANDS = """```bash
# the model GGUF reassembled on the GPU machine from parts (../shared/tools/split-for-device), data in .data/
python benchmarks/accuracy.py --model /root/xfer/qwen05.gguf --data-dir .data --task math --seeds 0,1 \\
  --methods base,dense,sparselora,svd:0,oracle:0 --max-steps 200 --batch-size 16 --test-limit 500 \\
  --eval-batch-size 500 --out /root/xfer/accuracy-qwen2.5-coder-0.5b-math.json  # resumable: re-run until done
python benchmarks/accuracy.py --model /root/xfer/qwen05.gguf --data-dir .data --task commonsense --seeds 0,1 \\
  --methods base,dense,sparselora,svd:0,oracle:0 --max-steps 600 --batch-size 16 --test-limit 500 \\
  --eval-batch-size 500 --out /root/xfer/accuracy-qwen2.5-coder-0.5b-commonsense.json
```"""
TASK_SETS = {"math": ["gsm8k"], "commonsense": ["boolq", "piqa", "social_i_qa", "winogrande", "arc_easy", "openbookqa"]}


def pm(values, scale=100.0) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.1f}"
    half = (max(values) - min(values)) * scale / 2
    return f"{m:.1f} ± {half:.1f}"


def diverged(m: dict) -> list[int]:
    """Seeds whose training loss ended non-finite: their accuracy says nothing about the method."""
    losses = m.get("final_loss") or []
    return [seed for seed, x in zip(m.get("seeds", []), losses) if x is None or not math.isfinite(x)]


def accuracy_section(doc: dict, path: Path) -> list[str]:
    cfg = doc.get("config", {})
    sets = list(next((m["accuracy"] for m in doc["methods"].values() if m.get("accuracy")), {}) or TASK_SETS[doc["task"]])
    tests = cfg.get("tests", {})
    head = ["method", "seeds"] + [f"{s} (n={tests.get(s, {}).get('n', '?')})" for s in sets] + ["average", "FLOPs % dense", "held-out loss (dense eval)", "train s/run"]
    model = path.stem.removeprefix("accuracy-").removesuffix(f"-{doc['task']}")  # the alias, not the file name used
    lines = [f"### {model} — {doc['task']}", ""]
    lines.append(f"GPU: {doc.get('gpu')}; versions: " + ", ".join(f"{k} {v}" for k, v in (doc.get("versions") or {}).items() if v)
                 + f"; commit `{doc.get('commit')}`; updated {doc.get('updated')}; file `{path.relative_to(REPO) if path.is_relative_to(REPO) else path}`.")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    names = sorted(doc["methods"], key=lambda n: ORDER.index(n) if n in ORDER else 99)
    for name in names:
        m = doc["methods"][name]
        if not m.get("seeds") and m.get("errors"):
            lines.append(f"| {name} | – | " + " | ".join("error" for _ in sets) + " | error | – | – | – |")
            continue
        if not m.get("seeds"):  # asked for, not run (the GPU time ran out): say so, never a number
            lines.append(f"| {name} (not run) | – | " + " | ".join("–" for _ in sets) + " | – | – | – | – |")
            continue
        acc = m.get("accuracy", {})
        fl = f"{100 * m['flops_ratio']:.1f}" if "flops_ratio" in m and name != "base" else ("–" if name == "base" else "100.0")
        ts = pm(m.get("train_seconds"), 1.0) if m.get("train_seconds") else "–"
        held = [v for v in m.get("heldout_dense_loss") or [] if v is not None]
        hl = "–" if not held else (f"{statistics.fmean(held):.4f}" if len(held) == 1 else
                                   f"{statistics.fmean(held):.4f} ± {(max(held) - min(held)) / 2:.4f}")
        row = [name, ",".join(map(str, m.get("seeds", [])))] + [pm(acc.get(s)) for s in sets] + [pm(m.get("average")), fl,
                                                                                                    hl, ts]
        if m.get("errors"):
            row[0] += " (errors: " + ", ".join(f"seed {k}" for k in m["errors"]) + ")"
        if diverged(m):
            row[0] += " (training diverged, loss NaN: seeds " + ",".join(map(str, diverged(m))) + ")"
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    runs = [r for m in doc["methods"].values() for r in m.get("runs", {}).values() if "steps" in r]
    r0 = runs[0] if runs else {}
    data = r0.get("data", {})
    steps = r0.get("steps")
    lines.append(
        f"Training: {cfg.get('training', 'benchmarks/accuracy.py')}. {steps} steps x batch {cfg.get('batch_size')} "
        f"(max length {cfg.get('max_length')}; {data.get('examples', '?')} training examples of "
        f"{cfg.get('train_file')}, {cfg.get('heldout')} held out), lr {cfg.get('lr')}, LoRA dropout "
        f"{cfg.get('lora_dropout')}; path: {r0.get('training_path', '?')}. Tokens per example "
        f"{data.get('mean_tokens', 0):.0f} (labelled {data.get('mean_labelled', 0):.0f}). Sparsity: "
        f"{cfg.get('sparsity') or 'the finetune default'}, "
        + (f"probe KL <= {cfg.get('kl_bound')} nats/token " if cfg.get("probe") == "kl"
           else f"probe: loss bound +{100 * (cfg.get('loss_bound') or 0):.0f}% (the default before the KL probe) ")
        + "(svd/oracle/...: the same seed's calibrated sparselora config, selector swapped; sampled-m0: the default "
        "selector without its average over batches, `score_momentum` 0). Default selector: "
        + f"`{doc.get('default_selector')}`. Evaluation: greedy, max {cfg.get('max_new_tokens')} new tokens"
        + ("; test subsets: " + ", ".join(f"{k} {v['n']}/{v['n_total']}" for k, v in tests.items() if v["n"] < v["n_total"])
           if any(v["n"] < v["n_total"] for v in tests.values()) else "; full test sets") + ".")
    lines.append("")
    lines.append(f"Reproduce: `{doc.get('command')}`")
    lines.append("")
    lines.extend(goal_lines(doc))
    lines.append("")
    return lines


def paired_note(m: dict) -> str:
    """The paired difference on the same test examples, where the runs kept per-example hits."""
    p = m.get("paired_vs_dense")
    if not p:
        return ""
    lo, hi = p["ci95"]
    verdict = (f"short of -{GOAL_POINTS} with 95% confidence" if hi < -GOAL_POINTS else
               f"within -{GOAL_POINTS} with 95% confidence" if lo >= -GOAL_POINTS else
               f"-{GOAL_POINTS} lies inside it: undecided at this test size")
    return (f" Paired on the same test examples: {p['points']:+.2f} points, 95% interval [{lo:+.2f}, {hi:+.2f}]: "
            f"{verdict}.")


def goal_lines(doc: dict) -> list[str]:
    ms = doc["methods"]
    out = []
    goal_ratio = GOAL_RATIO[doc["task"]]
    for sparse, dense in (("sparselora", "dense"),):
        s, d = ms.get(sparse, {}), ms.get(dense, {})
        if not s.get("average") or not d.get("average"):
            continue
        if diverged(s) or diverged(d):
            out.append(f"- Goal ({sparse} vs {dense}): **not assessable** — training diverged (loss NaN) in "
                       f"{sparse} seeds {diverged(s)} and {dense} seeds {diverged(d)}; the accuracies are of broken adapters.")
            continue
        gap = 100 * (statistics.fmean(s["average"]) - statistics.fmean(d["average"]))
        ratio = s.get("flops_ratio", 1.0)
        ok_acc, ok_fl = gap >= -GOAL_POINTS, ratio <= goal_ratio
        verdict = "MET" if ok_acc and ok_fl else "NOT met"
        out.append(f"- Goal ({sparse} vs {dense}: within {GOAL_POINTS} points of the task average at <= "
                   f"{100 * goal_ratio:.0f}% FLOPs): **{verdict}** — accuracy {gap:+.2f} points "
                   f"({'ok' if ok_acc else 'short by %.2f' % (-GOAL_POINTS - gap)}), FLOPs {100 * ratio:.1f}% "
                   f"({'ok' if ok_fl else 'over by %.1f points' % (100 * (ratio - goal_ratio))}); seeds "
                   f"{s.get('seeds')} vs {d.get('seeds')}." + paired_note(s))
        skipped = [x for x in (s.get("skipped_steps") or []) + (d.get("skipped_steps") or []) if x]
        if skipped:
            out.append(f"  Optimizer steps skipped for a non-finite gradient: {skipped}.")
        for seed, p in zip(s.get("seeds", []), s.get("probe") or []):
            if p and p.get("rounds"):
                last = p["rounds"][-1]
                kl = p.get("criterion") == "kl"
                bound = f"KL {last['kl']:.3f}, bound {p['bound']:g}" if kl else f"bound +{100 * p['bound']:.0f}%"
                out.append(f"  Seed {seed}: the sparsity probe (frozen model, first batches) measured dense loss "
                           f"{p['dense_loss']:.3f}; it trained with the default config x{last['scale']:.2f} "
                           f"(sparse loss {last['sparse_loss']:.3f}, {100 * last['increase']:+.1f}%, {bound}"
                           + ("" if p.get("within_bound") else ", NOT within it") + ").")
    if "oracle" in ms and ms["oracle"].get("average") and ms.get("dense", {}).get("average") and not (
            diverged(ms["oracle"]) or diverged(ms["dense"])):
        g = 100 * (statistics.fmean(ms["oracle"]["average"]) - statistics.fmean(ms["dense"]["average"]))
        out.append(f"- Oracle selection vs dense: {g:+.2f} points (what perfect channel selection would give at these sparsities).")
    if not out:
        out.append("- Goal: not assessable yet (needs dense and sparselora results).")
    return out


KIND_TITLES = {"ffn": "FFN", "attention": "attention (worse of q/k and v)", "attention_qk": "attention q/k",
               "attention_v": "attention v/o"}


def recall_section(doc: dict, path: Path) -> list[str]:
    """Per model: mass vs the oracle (mean over the config's sparse layers, worst layer in brackets) and recall, every
    selector and level, FFN and attention; the whole-config loss per selector; per-layer mass at the top level."""
    a = doc["architecture"]
    lines = [f"### {doc['model']} ({a['model_type']}, {a['num_layers']} layers, FFN {a['intermediate_size']}, "
             f"heads {a['num_heads']}/{a['num_kv_heads']}), batches of {doc['batch_size']}", ""]
    cl = doc["config_layers"]
    lines.append(f"{doc['samples']} examples of `{doc['data']}` in batches of {doc['batch_size']} ({doc['context_tokens']} "
                 f"context, {doc['labelled_tokens']} labelled tokens), {doc['dtype']} on {doc['device']}; commit "
                 f"`{doc['commit']}`; `{doc['command']}`. Layers: the {doc['config']}'s sparse layers (FFN {_rng(cl['ffn'])}, "
                 f"attention {_rng(cl['attention'])}). Library default selector: **{doc['default_selector']}** "
                 f"({doc['sample_rows']} rows).")
    if doc.get("spread_rows"):
        mean = {lv: sum(r.values()) / len(r) for lv, r in doc["spread_rows"].items()}
        lines[-1] += (" What `sparselora finetune` runs: **sampled-spread**, the same selector with its FFN rows "
                      f"spread over the layers by its probe (chosen on {doc['calib_batches']} other batches; mean rows "
                      + ", ".join(f"{m:.0f} at {lv}" for lv, m in mean.items()) + ").")
    lines.append("")
    for kind in ("ffn", "attention", "attention_qk", "attention_v"):
        mass, rec = doc["mass_vs_oracle"][kind], doc["recall"][kind]
        levels = list(mass)
        lines.append(f"| {KIND_TITLES[kind]}: mass (worst layer) / recall | " + " | ".join(f"sparsity {lv}" for lv in levels) + " |")
        lines.append("|---|" + "---|" * len(levels))
        for sel in mass[levels[0]]:
            cells = [f"{mass[lv][sel]['config_layers_mean']:.3f} ({mass[lv][sel]['config_layers_min']:.2f}) / "
                     f"{rec[lv][sel]['config_layers_mean']:.2f}" for lv in levels]
            name = f"**{sel}**" if sel in (doc["default_selector"], "sampled-spread") else sel
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    loss = doc.get("loss")
    if loss:
        sels = [k for k in loss if k not in ("batches", "config", "dense")]
        lines.append(f"Loss of the frozen model on the first {loss['batches']} batch(es) with the whole config "
                     f"({loss['config']}): dense {loss['dense']:.3f}; " + ", ".join(f"{k} {loss[k]:.3f}" for k in sels) + ".")
        lines.append("")
    for kind in ("ffn", "attention"):
        per = doc["mass_vs_oracle_per_layer"][kind]
        lv = list(per)[-1]
        sels = list(per[lv])
        layers = list(per[lv][sels[0]])
        lines += ["<details><summary>" + f"{KIND_TITLES[kind]}: mass vs the oracle per layer at sparsity {lv}" + "</summary>", "",
                  "| layer | " + " | ".join(sels) + " |", "|---|" + "---|" * len(sels)]
        lines += [f"| {i} | " + " | ".join(f"{per[lv][sel][i]:.3f}" for sel in sels) + " |" for i in layers]
        lines += ["", "</details>", ""]
    return lines


def _rng(xs):
    return f"{xs[0]}-{xs[-1]}" if xs else "none"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--out", default=str(REPO / "docs" / "results.md"))
    args = p.parse_args(argv)
    res = Path(args.results)
    acc = sorted(res.glob("accuracy-*.json"))
    rec = sorted(res.glob("recall-*.json"))
    lines = ["# Results", "",
             "Generated by `python benchmarks/make_results_md.py` from `benchmarks/results/accuracy-*.json` and "
             "`recall-*.json`; do not edit by hand.", "",
             "## Accuracy (issue 11)", "",
             f"Goal: SparseLoRA within {GOAL_POINTS} points of dense LoRA on each task's average accuracy at <= "
             + " / ".join(f"{100 * r:.0f}% ({t})" for t, r in GOAL_RATIO.items()) + " of dense FLOPs per step. "
             "Every trained row is one `sparselora finetune` run (`sparselora.train.finetune`). Cells: accuracy in "
             "points, mean over seeds ± half the spread (max - min); FLOPs: analytic (`sparselora.flops`, the "
             "selector's own scoring included) per sparse step at the run's mean example lengths; train s: wall "
             "time of one run (mean ± half spread).", ""]
    docs = [(f, json.loads(f.read_text())) for f in acc]
    docs = [(f, d) for f, d in docs if d.get("methods")]
    for task in ("math", "commonsense"):
        have = [(f, d) for f, d in docs if d.get("task") == task]
        if not have:
            lines += [f"### {task}", "", "Not yet run (`benchmarks/accuracy.py --task %s`; commands below)." % task, ""]
        for f, d in have:
            lines += accuracy_section(d, f)
    lines += ["What the numbers mean, and what was tried: [accuracy-notes.md](accuracy-notes.md). The commands that "
              "made the tables (one H200; copy the JSONs into `benchmarks/results/`, then re-run this script):", "",
              GPU_COMMANDS, ""]
    lines += ["## Selectors against the oracle on real activations (issue 11)", "",
              "How close each selector's channels come to the oracle's (the true activations of the batch's context rows) "
              "on real GSM8K batches of real models: **mass** = the oracle's channel scores summed over the chosen "
              "channels / over the oracle's own (1.0 = as good as the oracle), **recall** = the share of the oracle's "
              "channels chosen. `sampled`: the oracle's score on a few evenly spaced context rows, for the FFN averaged "
              "over the earlier batches (`score_momentum`; files made before it: each batch alone), `sampled-m0`: "
              "each batch's sample alone, `sampled-S`: that on S rows; `sampled-spread`: the default with its FFN rows "
              "spread over the layers by need at the same mean (what `sparselora finetune`'s probe does); "
              "`mean`: on the mean context row; `labelled`: on the labelled rows; `svd`: the paper's rank-8 estimator "
              "(q/k/v biases included), `svd-rN` rank N; `l2`: q and k (FFN: gate and up) scored apart. Goal: the "
              "default keeps >= 0.95 of the oracle's mass on average and >= 0.90 in the worst layer. From "
              "`benchmarks/recall.py`.", ""]
    for f in rec:
        d = json.loads(f.read_text())
        if "mass_vs_oracle" in d:
            lines += recall_section(d, f)
    if not rec:
        lines += ["Not yet run.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
