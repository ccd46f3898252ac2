"""`sparselora flops`: analytic FLOPs of one training step, dense vs SparseLoRA (reads only the config)."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "analytic FLOPs of a LoRA step, dense vs sparse (no weights are loaded)"


def register(subparsers) -> None:
    p = subparsers.add_parser("flops", help=HELP, description=HELP)
    p.add_argument("--model", required=True, help="an alias (its config ships with sparselora: no weight package "
                   "needed), a model folder or a config.json (required)")
    p.add_argument("--sparsity", help="a preset name or SparseLoRAConfig YAML (default: 'scaled' for the model's "
                   "depth)")
    p.add_argument("--batch", default="8x512", help="batch x sequence length, both >= 1 (default: 8x512)")
    p.add_argument("--labelled", type=int, default=128,
                   help="labelled (output) tokens per sequence, 0 to the sequence length (default: 128)")
    p.add_argument("--lora-r", type=int, default=32, help="LoRA rank (default: 32)")
    p.add_argument("--lora-targets", default="q,k,v,o", help="comma list from q,k,v,o,gate,up,down (default: q,k,v,o)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (default: a table)")
    p.set_defaults(func=run)


def load_config(model: str):
    """The transformers config of an alias / folder / config.json, without loading weights."""
    from transformers import AutoConfig

    from sparselora.cli.main import CLIError
    from sparselora.loading import ALIASES, resolve_model

    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path),
                                          local_files_only=True)
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    if not path.exists() and model.strip().lower() not in ALIASES:
        raise CLIError(f"{model!r} is neither a model folder, a config.json nor a known alias "
                       f"({', '.join(ALIASES)})")
    if not path.exists():
        from sparselora.loading import alias_config

        return alias_config(model)  # shipped with sparselora: no weights, no weight package
    return AutoConfig.from_pretrained(str(resolve_model(model)), local_files_only=True)  # a GGUF: converts once


def parse_batch(text: str) -> tuple[int, int]:
    """``BxT`` as (B, T), both >= 1, or a CLIError that says what is expected."""
    from sparselora.cli.main import CLIError

    parts = str(text).lower().replace("*", "x").split("x")
    try:
        b, t = (int(v) for v in parts)
    except ValueError:
        raise CLIError(f"--batch {text!r}: expected BATCHxLENGTH, e.g. 8x512") from None
    if b < 1 or t < 1:
        raise CLIError(f"--batch {text!r}: batch size and sequence length must both be >= 1, e.g. 8x512")
    return b, t


def run(args) -> int:
    from sparselora.flop_count import flops
    from sparselora.models.registry import arch_info
    from sparselora.report import _fmt_flops
    from sparselora.train import sparsity_config

    from sparselora.cli.main import CLIError

    batch = parse_batch(args.batch)
    if not 0 <= args.labelled <= batch[1]:
        raise CLIError(f"--labelled {args.labelled}: must be between 0 and the sequence length {batch[1]} "
                       f"of --batch {args.batch}")
    if args.lora_r < 1:
        raise CLIError(f"--lora-r must be >= 1, got {args.lora_r}")
    config = load_config(args.model)
    arch = arch_info(config)
    sp = sparsity_config(args.sparsity, arch.num_layers)
    targets = tuple(t.strip().removesuffix("_proj") for t in args.lora_targets.split(",") if t.strip())
    f = flops(config, sp, batch, args.labelled, lora_rank=args.lora_r, lora_targets=targets)
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "labelled": args.labelled, **f}, indent=2))
        return 0
    print(f"{args.model}: {arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size}, "
          f"FFN {arch.intermediate_size}, heads {arch.num_heads}/{arch.num_kv_heads}")
    print(f"batch {args.batch}, {args.labelled} labelled tokens per sequence, LoRA r={args.lora_r} on "
          f"{','.join(targets)}; sparsity: {args.sparsity or 'scaled'}")
    for key in ("dense", "sparse", "estimator", "attention_core", "lm_head"):
        print(f"  {key:16}{_fmt_flops(f[key]):>14}")
    print(f"  sparse/dense    {f['ratio']:>13.3f}   ({1 / f['ratio']:.2f}x fewer FLOPs)")
    return 0
