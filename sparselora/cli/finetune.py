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
    "seed": "seed", "dtype": "dtype", "save_steps": "save_steps", "data_format": "data_format",
    "limit": "limit", "estimator_dir": "estimator_dir", "threads": "threads",
}
_SWITCHES = {"dense": "dense", "gradient_checkpointing": "gradient_checkpointing", "fast_kernels": "fast_kernels",
             "cuda_graphs": "cuda_graphs",
             "skip_bad_lines": "skip_bad_lines", "merge": "merge"}


def add_run_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--model", help="a local Hugging Face folder, a .gguf file or an alias (smollm2-135m, "
                   "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)")
    g.add_argument("--data", help="training data: JSONL/JSON (GSM8K, LLM-Adapters, prompt/completion or chat)")
    g.add_argument("--output", help="run folder (adapter, summary.json, loss.png, checkpoints)")
    g.add_argument("--config", help="run config YAML (keys: RunConfig fields; flags override it)")
    g.add_argument("--sparsity", help="a preset name or a SparseLoRAConfig YAML (default: 'scaled' for the "
                   "model's depth)")
    g.add_argument("--dense", action="store_true", default=None, help="the dense LoRA baseline (sparsity off)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --output")
    g.add_argument("--merge", action="store_true", default=None, help="also write base+adapter merged weights")
    t = p.add_argument_group("training (defaults: r=32 alpha=64 q,k,v,o, lr 3e-4 cosine, warm-up 0.04)")
    t.add_argument("--lora-r", type=int)
    t.add_argument("--lora-alpha", type=float)
    t.add_argument("--lora-dropout", type=float)
    t.add_argument("--lora-targets", help="comma list from q,k,v,o,gate,up,down")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--lr-scheduler", help="transformers scheduler name (cosine, linear, constant, ...)")
    t.add_argument("--warmup", type=float, help="warm-up: fraction of steps if < 1, else steps")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    t.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-length", type=int, help="max tokens per example (prompts are cut from the left)")
    t.add_argument("--seed", type=int)
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on CPU")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None)
    t.add_argument("--fast-kernels", action="store_true", default=None,
                   help="fused RMSNorm/SiLU*up and an LM head on labelled tokens only (dense and sparse alike)")
    t.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="replay forward + backward from CUDA graphs (one per batch signature; pays off with "
                        "repeated shapes; eager on CPU)")
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 50)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    d = p.add_argument_group("data")
    d.add_argument("--data-format", help="auto, gsm8k, instruction, prompt_completion or chat")
    d.add_argument("--skip-bad-lines", action="store_true", default=None, help="skip malformed records")
    d.add_argument("--limit", type=int, help="use only the first N examples")
    d.add_argument("--estimator-dir", help="SVD estimator cache folder")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_config_from_args(args):
    """RunConfig from defaults < --config YAML < flags."""
    from sparselora.train import RunConfig, read_yaml_config

    values = read_yaml_config(args.config) if getattr(args, "config", None) else {}
    for flag, key in {**_FLAGS, **_SWITCHES}.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[key] = v
    return RunConfig.from_dict(values, source=args.config or "flags")


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help=HELP, description=HELP)
    add_run_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from sparselora.cli.main import CLIError
    from sparselora.train import finetune

    cfg = run_config_from_args(args)
    if args.resume and cfg.output:  # `--output DIR --resume` alone is enough: the rest is saved there
        cfg = _fill_from_saved(cfg)
    if not (cfg.model and cfg.data and cfg.output):
        missing = [f"--{k}" for k in ("model", "data", "output") if not getattr(cfg, k)]
        raise CLIError(f"missing {', '.join(missing)} (or set them in --config)")
    summary = finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    f = summary["flops"]
    print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.1f} s, final loss "
        f"{summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}, "
        f"{summary['tokens_per_second'] or 0:.0f} tokens/s; analytic FLOPs/step dense {f['dense']:.3g}, "
        f"sparse {f['sparse']:.3g} ({f['speedup']:.2f}x)\n"
        f"adapter: {summary['adapter']}\nsummary: {summary['output']}/summary.json"
    )
    return 0


def _fill_from_saved(cfg):
    """With --resume, model/data may be left out: they come from the saved run_config.yaml."""
    from pathlib import Path

    import yaml

    from sparselora.train import RunError

    saved_path = Path(cfg.output).expanduser() / "run_config.yaml"
    if not saved_path.is_file():
        raise RunError(f"nothing to resume in {cfg.output}: it has no run_config.yaml (start without --resume)")
    saved = yaml.safe_load(saved_path.read_text()) or {}
    for key in ("model", "data"):
        if getattr(cfg, key) is None:
            setattr(cfg, key, saved.get(key))
    return cfg
