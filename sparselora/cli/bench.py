"""`sparselora bench`: runs benchmarks/bench_step.py (a source checkout is needed) with the given arguments."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HELP = "GPU step benchmark (benchmarks/bench_step.py; arguments are passed through)"


def find_bench() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / "benchmarks" / "bench_step.py"
        if p.is_file():
            return p
    return None


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help=HELP, description=HELP + "; try `sparselora bench -- --help`",
                              add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of bench_step.py")
    p.set_defaults(func=run)


def run(args) -> int:
    from sparselora.cli.main import CLIError

    path = find_bench()
    if path is None:
        raise CLIError("benchmarks/bench_step.py not found: `sparselora bench` runs from a source checkout of "
                       "sparselora (run it in the repository root)")
    passed = [a for a in args.bench_args if a != "--"] if args.bench_args[:1] == ["--"] else args.bench_args
    spec = importlib.util.spec_from_file_location("sparselora_bench_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
        try:
            rc = module.main(passed)
        except SystemExit as exc:  # argparse --help / usage errors
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
    return int(rc or 0)
