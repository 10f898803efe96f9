"""``stream-trainer bench NAME``: run a benchmark of the ``bench`` package (from a checkout).

The ``bench`` package lives beside ``stream_trainer`` in the repository, not in the installed
wheel; it is imported only when this command runs, so the rest of the CLI does not pay for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stream_trainer.errors import ConfigError

__all__ = ["register"]

_BENCHES = ("accuracy", "sweep", "gap", "norm_time", "throughput", "report", "all", "envs")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks that write BENCHMARKS.md (accuracy, gap, norm_time, throughput, ...)",
        description=__doc__,
        add_help=False,
    )
    p.add_argument("name", nargs="?", choices=_BENCHES, metavar="NAME", help=", ".join(_BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the bench (see NAME -h)")
    p.add_argument("-h", "--help", action="store_true")
    p.set_defaults(func=run_bench)


def _import_bench_cli() -> Any:
    try:
        from bench import cli
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "bench" / "cli.py").exists():
            raise ConfigError(
                "no bench package here: run `stream-trainer bench` from a repository checkout"
            ) from None
        sys.path.insert(0, str(root))
        from bench import cli
    return cli


def run_bench(args: argparse.Namespace) -> int:
    cli = _import_bench_cli()
    argv = ([args.name] if args.name else []) + list(args.rest or [])
    if args.help or not args.name:
        argv.append("-h")
    try:
        return int(cli.main(argv) or 0)
    except SystemExit as exc:  # argparse's -h / usage errors
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
