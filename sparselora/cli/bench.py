"""`sparselora bench`: the benchmarks that ship with the package. ``--trainer`` runs the Trainer-level training
benchmark (real data lengths, every dense and sparse method; sparselora/bench/train.py); without it, the
kernel-level step benchmark on a fixed batch (sparselora/bench/step.py). Arguments after the flag go to the
benchmark. Neither needs a source checkout."""

from __future__ import annotations

import argparse
import sys

HELP = "benchmarks: --trainer (training throughput on real data lengths), else one step on a fixed batch"


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help=HELP, description=HELP + "; try `sparselora bench --trainer --help`",
                              add_help=False, prog="sparselora bench")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="--trainer [ARGS] for the Trainer benchmark (sparselora/bench/train.py), else the arguments "
                        "of the step benchmark (sparselora/bench/step.py)")
    p.set_defaults(func=run)


def _exit_code(fn, argv) -> int:
    try:
        rc = fn(argv)
    except SystemExit as exc:  # argparse --help / usage errors, or the benchmark's own refusal (a message)
        if isinstance(exc.code, str):
            print(f"sparselora bench: {exc.code}", file=sys.stderr)
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return rc if isinstance(rc, int) else 0  # a benchmark's main may return its record


def run(args) -> int:
    passed = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if passed[:1] == ["--trainer"]:
        from sparselora.bench import train as bench

        passed = passed[1:]
    else:
        from sparselora.bench import step as bench
    return _exit_code(bench.main, passed)
