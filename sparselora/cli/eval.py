"""`sparselora eval`: accuracy of a model (optionally with a LoRA adapter) by greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "accuracy of a model (+ LoRA adapter) on a math / AQuA / commonsense test file"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--model", help="a local Hugging Face folder, a .gguf file or an alias (default with --adapter: "
                   "the base model the adapter was trained on; required without --adapter)")
    p.add_argument("--adapter", help="a LoRA adapter folder, e.g. RUN/adapter of sparselora finetune (default: none, "
                   "the base model alone)")
    p.add_argument("--data", required=True, help="test data: JSONL/JSON with gold answers (required)")
    p.add_argument("--task", default="math", choices=["math", "commonsense", "aqua"],
                   help="how answers are extracted and compared (default: math)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples, N >= 1 (default: all)")
    p.add_argument("--data-format", default="auto",
                   help="auto, gsm8k, instruction, prompt_completion or chat (default: auto)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed records (default: refuse the file, naming the line)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit (default: 256)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on CPU (default: auto)")
    p.add_argument("--out", help="folder for <name>.predictions.jsonl and <name>.scores.json (default: RUN/eval "
                   "beside the adapter's run folder, else ./sparselora-eval)")
    p.add_argument("--name", help="file name stem of the outputs (default: the task)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: half the usable cores, at most 4 — "
                   "the rule of every sparselora command)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: one per example)")
    p.set_defaults(func=run)


def base_of_adapter(adapter: Path) -> str | None:
    """The base model an adapter was trained on: its adapter_config.json's base_model_name_or_path when that
    exists here, else the `model` of the finetune run folder it sits in (RUN/run_config.yaml)."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError):
        base = None
    if base and Path(base).expanduser().exists():
        return str(base)
    run_cfg = adapter.parent / "run_config.yaml"
    if run_cfg.is_file():
        import yaml

        try:
            model = (yaml.safe_load(run_cfg.read_text()) or {}).get("model")
        except yaml.YAMLError:
            model = None
        if model:
            return str(model)
    return base or None


def load_adapter(model, adapter: Path, model_name: str):
    """PeftModel.from_pretrained, with one line (not a page of size mismatches) for an adapter of another base."""
    from peft import PeftModel

    from sparselora.cli.main import CLIError

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        trained_on = base_of_adapter(adapter) or "another model"
        raise CLIError(
            f"adapter {adapter} was trained on another base model ({trained_on}), not {model_name}: its weight "
            f"shapes do not fit. Pass that base with --model, or leave --model out to use it."
        ) from None


def run(args) -> int:
    from sparselora.cli.main import CLIError

    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1, got {args.limit} (leave it out to evaluate every example)")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise CLIError("--batch-size and --max-new-tokens must be >= 1")
    if args.threads is not None and args.threads < 0:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    adapter = None
    if args.adapter is not None:
        adapter = Path(args.adapter).expanduser()
        if not (adapter / "adapter_config.json").is_file():
            raise CLIError(f"adapter folder {adapter} has no adapter_config.json (pass RUN/adapter of a finetune run)")
    model_name = args.model
    if model_name is None:
        if adapter is None:
            raise CLIError("missing --model (or --adapter, whose base model is then used)")
        model_name = base_of_adapter(adapter)
        if model_name is None:
            raise CLIError(f"adapter {adapter} does not say which base model it was trained on; pass --model")
    import torch

    from sparselora.data import load_examples
    from sparselora.evaluate import evaluate
    from sparselora.evaluate.runner import check_gold
    from sparselora.loading import load_model
    from sparselora.train import resolve_dtype, set_threads

    threads = set_threads(args.threads)
    examples = load_examples(args.data, fmt=args.data_format, skip_bad_lines=args.skip_bad_lines, limit=args.limit)
    check_gold(examples, args.task)  # before loading the model: data of another task is an error
    cuda = torch.cuda.is_available()
    if not cuda and args.dtype == "float16":
        print("note: --dtype float16 on a CPU runs float16 weights and activations (slow on most CPUs); "
              "--dtype auto uses float32", file=__import__("sys").stderr)
    model, tokenizer = load_model(model_name, dtype=resolve_dtype(args.dtype), device="cuda" if cuda else None)
    if adapter is not None:
        model = load_adapter(model, adapter, model_name)
        model.eval()
    out = Path(args.out).expanduser() if args.out else (
        adapter.parent / "eval" if adapter is not None and (adapter.parent / "run_config.yaml").is_file()
        else Path("sparselora-eval"))
    scores = evaluate(model, tokenizer, examples, task=args.task, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, out_dir=out, name=args.name,
                      progress=not args.no_progress)
    lo, hi = scores["ci95"]
    print(f"{scores['task']}: accuracy {scores['accuracy']:.2%} ({scores['correct']}/{scores['n']}, 95% CI "
          f"{lo:.1%}-{hi:.1%}), {scores['n_unparsed']} unparsed, {scores['seconds']:.1f} s on "
          f"{'a GPU' if cuda else f'{threads} CPU thread(s)'}")
    print(f"predictions: {scores['predictions_path']}\nscores: {out / ((args.name or args.task) + '.scores.json')}")
    return 0
