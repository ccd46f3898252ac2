"""`sparselora finetune`: LoRA fine-tuning with SparseLoRA (or the dense baseline) via transformers.Trainer."""

from __future__ import annotations

import argparse

HELP = "fine-tune a LoRA adapter with SparseLoRA (or --dense for the baseline)"

# flag -> RunConfig field; every flag defaults to None so that only what was given overrides the YAML config
_FLAGS = {
    "model": "model", "data": "data", "output": "output", "sparsity": "sparsity",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "lora_targets": "lora_targets",
    "lr": "learning_rate", "lr_scheduler": "lr_scheduler", "warmup": "warmup", "batch_size": "batch_size",
    "grad_accum": "grad_accum", "max_steps": "max_steps", "epochs": "epochs", "max_length": "max_length",
    "seed": "seed", "dtype": "dtype", "save_steps": "save_steps", "logging_steps": "logging_steps", "data_format": "data_format",
    "limit": "limit", "estimator_dir": "estimator_dir", "threads": "threads", "loss_bound": "loss_bound",
    "probe": "probe", "kl_bound": "kl_bound",
    "heldout": "heldout",
}
_OFF = object()  # --loss-bound off: the flag given, its value None


def loss_bound_type(off):
    """The argparse type of a --loss-bound flag (finetune, sensitivity): a number, or off/none, read as ``off``."""
    def parse(text: str):
        if text.strip().lower() in ("off", "none"):
            return off
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--loss-bound takes a number (e.g. 0.05) or 'off', not {text!r}") from None

    return parse


_bound = loss_bound_type(_OFF)
_SWITCHES = {"dense": "dense", "gradient_checkpointing": "gradient_checkpointing", "fast_kernels": "fast_kernels",
             "cuda_graphs": "cuda_graphs", "packing": "packing",
             "skip_bad_lines": "skip_bad_lines", "merge": "merge"}


def _d(name: str) -> str:
    """' (default: X)' from RunConfig's defaults: the flags themselves default to None (see _FLAGS)."""
    from sparselora.train import RunConfig

    v = getattr(RunConfig(), name)
    if isinstance(v, list):
        v = ",".join(v)
    return f" (default: {v})"


def add_run_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--model", help="a local Hugging Face folder, a .gguf file or an alias (smollm2-135m, "
                   "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b); required unless --resume")
    g.add_argument("--data", help="training data: JSONL/JSON (GSM8K, LLM-Adapters, prompt/completion or chat); "
                   "required unless --resume")
    g.add_argument("--output", help="run folder (adapter/, summary.json, loss.png, checkpoints/); required")
    g.add_argument("--config", help="run config YAML (keys: the fields of sparselora.train.RunConfig; flags "
                   "override it) (default: none)")
    g.add_argument("--sparsity", help="a preset name or a SparseLoRAConfig YAML (default: the 'scaled' preset "
                   "for the model's depth)")
    g.add_argument("--dense", action="store_true", default=None,
                   help="the dense LoRA baseline: the same code with sparsity off (default: sparse)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last checkpoint with its saved settings; a finished "
                        "run is left as it is (default: off)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --output (it is kept until the new run has started, and "
                        "restored if the new one fails before its first checkpoint) (default: off)")
    g.add_argument("--merge", action="store_true", default=None,
                   help="also write base+adapter merged weights to OUTPUT/merged (default: off)")
    t = p.add_argument_group("training")
    t.add_argument("--lora-r", type=int, help="LoRA rank" + _d("lora_r"))
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha/r)" + _d("lora_alpha"))
    t.add_argument("--lora-dropout", type=float, help="LoRA dropout" + _d("lora_dropout"))
    t.add_argument("--lora-targets", help="comma list from q,k,v,o,gate,up,down" + _d("lora_targets"))
    t.add_argument("--lr", type=float, help="learning rate" + _d("learning_rate"))
    t.add_argument("--lr-scheduler", help="transformers scheduler name (cosine, linear, constant, ...)"
                   + _d("lr_scheduler"))
    t.add_argument("--warmup", type=float,
                   help="warm-up: a fraction of the steps if < 1 (rounded down), else a step count; its first step "
                        "already trains" + _d("warmup"))
    t.add_argument("--batch-size", type=int, help="examples per micro-batch" + _d("batch_size"))
    t.add_argument("--grad-accum", type=int, help="gradient accumulation steps" + _d("grad_accum"))
    t.add_argument("--max-steps", type=int, help="optimizer steps, >= 1; overrides --epochs (default: not set, "
                   "train for --epochs)")
    t.add_argument("--epochs", type=float, help="passes over the data when --max-steps is not given" + _d("epochs"))
    t.add_argument("--max-length", type=int, help="max tokens per example (prompts are cut from the left)"
                   + _d("max_length"))
    t.add_argument("--seed", type=int, help="seed of initialisation, data order and dropout" + _d("seed"))
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on CPU" + _d("dtype"))
    t.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward: far less memory, ~30%% more compute (default: off)")
    path = " (default: decided for the machine: on a GPU on where it applies, printed at the start)"
    t.add_argument("--fast-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="fused RMSNorm/SiLU*up and an LM head on labelled tokens only (dense and sparse alike; "
                        "also less memory)" + path)
    t.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay forward + backward from CUDA graphs (a few per run with packing; not with "
                        "gradient checkpointing or float16; without a GPU each step runs eagerly)" + path)
    t.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack examples into rows of a fixed token budget (about --batch-size examples each), "
                        "attention isolated per example: no padding, one batch shape" + path)
    t.add_argument("--heldout", type=int, metavar="N",
                   help="keep the last N examples out of training and report the adapter's loss on them, evaluated "
                        "dense (summary.json, loss.png)" + _d("heldout"))
    t.add_argument("--loss-bound", type=_bound, metavar="X|off",
                   help="before training, scale the sparsity down until the frozen model's loss on the first "
                        "batches rises at most X (relative) over dense (--probe loss); 'off' trains the config as "
                        "given" + _d("loss_bound"))
    t.add_argument("--probe", choices=("loss", "kl"),
                   help="what the sparsity probe bounds: 'loss', the relative rise of the mean loss (--loss-bound), "
                        "or 'kl', the mean KL(dense || sparse) of the next-token distributions over labelled tokens "
                        "(--kl-bound), which also sees short answers' changes that the mean loss hides" + _d("probe"))
    t.add_argument("--kl-bound", type=float, metavar="NATS",
                   help="the bound of --probe kl, in nats per labelled token" + _d("kl_bound"))
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps" + _d("save_steps"))
    t.add_argument("--logging-steps", type=int,
                   help="log the loss every N steps (default: every step on CPU, every 10 on a GPU, where each log "
                        "is a host sync)")
    t.add_argument("--threads", type=int,
                   help="torch CPU threads (default: half the usable cores, at most 4 — the rule of every "
                        "sparselora command)")
    d = p.add_argument_group("data")
    d.add_argument("--data-format", help="auto, gsm8k, instruction, prompt_completion or chat" + _d("data_format"))
    d.add_argument("--skip-bad-lines", action="store_true", default=None,
                   help="skip malformed records (default: refuse the file, naming the line)")
    d.add_argument("--limit", type=int, help="use only the first N examples, N >= 1 (default: all)")
    d.add_argument("--estimator-dir", help="SVD estimator cache folder" + _d("estimator_dir"))
    d.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")


def run_config_from_args(args):
    """RunConfig from defaults < --config YAML < flags."""
    from sparselora.train import RunConfig, read_yaml_config

    values = read_yaml_config(args.config) if getattr(args, "config", None) else {}
    for flag, key in {**_FLAGS, **_SWITCHES}.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[key] = None if v is _OFF else v
    return RunConfig.from_dict(values, source=args.config or "flags")


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help=HELP, description=HELP)
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from sparselora.cli.main import CLIError
    from sparselora.train import finetune

    cfg = run_config_from_args(args)
    # `--output DIR --resume` alone is enough: the rest is saved there (finetune reads it)
    needed = ("output",) if args.resume else ("model", "data", "output")
    if not all(getattr(cfg, k) for k in needed):
        missing = [f"--{k}" for k in needed if not getattr(cfg, k)]
        raise CLIError(f"missing {', '.join(missing)} (or set them in --config)")
    summary = finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if summary.get("already_finished"):
        print(f"adapter: {summary['adapter']}\nsummary: {summary['output']}/summary.json")
        return 0
    f = summary["flops"]
    print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.1f} s, final loss "
        f"{summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}, "
        f"{summary['tokens_per_second'] or 0:.0f} tokens/s; analytic FLOPs/step dense {f['dense']:.3g}, "
        f"sparse {f['sparse']:.3g} ({f['speedup']:.2f}x)\n"
        f"adapter: {summary['adapter']}\nsummary: {summary['output']}/summary.json"
    )
    return 0

