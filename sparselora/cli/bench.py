"""`sparselora bench`: the benchmarks. ``--trainer`` runs the Trainer-level training benchmark that ships with the
package (real data lengths, every dense and sparse method); without it, the kernel-level step benchmark of a
source checkout (benchmarks/bench_step.py). Arguments after the flag go to the benchmark."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HELP = "benchmarks: --trainer (training throughput on real data lengths) or the step benchmark of a checkout"


def find_bench() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / "benchmarks" / "bench_step.py"
        if p.is_file():
            return p
    return None


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help=HELP, description=HELP + "; try `sparselora bench --trainer --help`",
                              add_help=False, prog="sparselora bench")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="--trainer [ARGS] for the Trainer benchmark (sparselora/bench/train.py), else the arguments "
                        "of benchmarks/bench_step.py")
    p.set_defaults(func=run)


def _exit_code(fn, argv) -> int:
    try:
        rc = fn(argv)
    except SystemExit as exc:  # argparse --help / usage errors
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return rc if isinstance(rc, int) else 0  # a benchmark's main may return its record


def run(args) -> int:
    from sparselora.cli.main import CLIError

    passed = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if passed[:1] == ["--trainer"]:
        passed = passed[1:]
        from sparselora.bench.train import main

        return _exit_code(main, passed)
    path = find_bench()
    if path is None:
        raise CLIError("benchmarks/bench_step.py not found: the step benchmark runs from a source checkout of "
                       "sparselora (run it in the repository root); `sparselora bench --trainer` runs anywhere")
    spec = importlib.util.spec_from_file_location("sparselora_bench_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
        return _exit_code(module.main, passed)
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
