"""`sparselora` command line: one sub-command per module in `sparselora/cli/<name>.py`.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Errors a user can fix (missing files, bad data, unknown models) are printed as one clear message and exit 2;
Ctrl-C exits 130. Set ``SPARSELORA_DEBUG=1`` to see the full traceback of any error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sparselora.errors import SparseLoRAError

COMMANDS = ("finetune", "eval", "sensitivity", "flops", "bench", "demo")


class CLIError(SparseLoRAError):
    """An error whose message is all the user needs (no traceback)."""


# Exception types that mean 'bad input': the library's own (DataFormatError, ModelLoadError, RunError, ...) are
# ValueErrors; a SparseLoRAError that is a RuntimeError (a setup that cannot work) is reported as unexpected.
USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselora",
        description="Faster LoRA fine-tuning by contextual sparsity (SparseLoRA).",
        epilog="Run `sparselora demo` for a few-minute CPU demonstration. SPARSELORA_DEBUG=1 shows tracebacks.",
    )
    from sparselora import __version__

    parser.add_argument("--version", action="version", version=f"sparselora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Every sub-command module is imported here, not lazily: `import sparselora` (torch, transformers, peft) is
    # nearly all of the start-up (4-8 s measured), the six modules add about 20 ms, and their heavy imports
    # (the benchmarks, matplotlib, the Trainer) already sit inside the functions that need them.
    for name in COMMANDS:
        module = importlib.import_module(f"sparselora.cli.{name}")
        module.register(sub)
        if name == "bench":
            parser._bench_func = module.run
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (and `sys.exit`s with it when run as the console script)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark (sparselora/bench/)
        args = argparse.Namespace(command="bench", bench_args=argv[1:], func=parser._bench_func)
    else:
        args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    debug = bool(os.environ.get("SPARSELORA_DEBUG"))
    from sparselora.train import return_freed_memory

    return_freed_memory()  # every command: freed tensors go back to the system (see there)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\nsparselora: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"sparselora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an unexpected failure: still one line, with a hint for the details
        if debug:
            raise
        print(
            f"sparselora {args.command}: unexpected {type(exc).__name__}: {exc}\n"
            "(run again with SPARSELORA_DEBUG=1 for the full traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
