"""`sparselora eval`: accuracy of a model (optionally with a LoRA adapter) by greedy generation."""

from __future__ import annotations

from pathlib import Path

HELP = "accuracy of a model (+ LoRA adapter) on a math / AQuA / commonsense test file"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help=HELP, description=HELP)
    p.add_argument("--model", required=True, help="a local Hugging Face folder, a .gguf file or an alias")
    p.add_argument("--adapter", help="a LoRA adapter folder (e.g. RUN/adapter from sparselora finetune)")
    p.add_argument("--data", required=True, help="test data: JSONL/JSON with gold answers")
    p.add_argument("--task", default="math", choices=["math", "commonsense", "aqua"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples")
    p.add_argument("--data-format", default="auto")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out", help="folder for <name>.predictions.jsonl and <name>.scores.json")
    p.add_argument("--name", help="file name stem for the outputs (default: the task)")
    p.set_defaults(func=run)


def run(args) -> int:
    from sparselora.cli.main import CLIError

    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    if args.adapter is not None:
        a = Path(args.adapter).expanduser()
        if not (a / "adapter_config.json").is_file():
            raise CLIError(f"adapter folder {a} has no adapter_config.json (pass RUN/adapter of a finetune run)")
    import torch

    from sparselora.data import load_examples
    from sparselora.evaluate import evaluate
    from sparselora.models import load_model
    from sparselora.train import resolve_dtype

    examples = load_examples(args.data, fmt=args.data_format, skip_bad_lines=args.skip_bad_lines, limit=args.limit)
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype),
                                  device="cuda" if torch.cuda.is_available() else None)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(args.adapter).expanduser()))
        model.eval()
    scores = evaluate(model, tokenizer, examples, task=args.task, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, out_dir=args.out, name=args.name)
    lo, hi = scores["ci95"]
    print(f"{scores['task']}: accuracy {scores['accuracy']:.2%} ({scores['correct']}/{scores['n']}, 95% CI "
          f"{lo:.1%}-{hi:.1%}), {scores['n_unparsed']} unparsed, {scores['seconds']:.1f} s")
    if args.out:
        print(f"predictions: {scores['predictions_path']}")
    return 0
