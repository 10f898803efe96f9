"""The bench command line: ``python -m bench NAME`` and ``stream-trainer bench NAME``.

=============  ============================================================================
name           what it measures (results in ``bench/results/NAME.json``, plots in ``docs/``)
=============  ============================================================================
``accuracy``   prequential accuracy vs batch size, per norm, per stream (cached, resumable)
``sweep``      learning rate x width for two norms at batch 1:64 (defaults recommendation)
``tuning``     candidate defaults' regret against the best fixed norm momentum, 21 streams
``gap``        train/serve gap of each norm after training at batch 64 and 1:64
``norm_time``  share of step time in norm layers (profiler); our layers vs native ones
``throughput`` samples/s of the trainer vs deep-river, plain PyTorch loops and river (ratios)
``report``     rewrite ``BENCHMARKS.md`` from the result files (no measuring)
``all``        every benchmark above, then ``report``
``envs``       create or check the deep-river environment used by ``throughput``
=============  ============================================================================

Every module is imported only when its command runs, so ``stream-trainer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["BENCHES", "add_subcommands", "main"]

BENCHES = ("accuracy", "sweep", "tuning", "gap", "norm_time", "throughput")
_HELP = {
    "accuracy": "prequential accuracy vs batch size per norm and stream",
    "sweep": "learning rate x width around the defaults (for the recommendation)",
    "tuning": "regret of candidate defaults against the best fixed momentum, vs river",
    "gap": "train/serve gap per norm (train at 64 and 1:64, serve at 1)",
    "norm_time": "share of step time in norm layers; our layers vs torch's",
    "throughput": "samples/s vs deep-river, plain nn.Sequential loops and river, in one run",
}


class _LazyArguments:
    """Adds a bench's arguments by importing its module only when that parser is built."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, parser: argparse.ArgumentParser) -> None:
        importlib.import_module(f"bench.{self.name}").add_arguments(parser)


def add_subcommands(sub: Any) -> None:
    """Add one sub-parser per bench (plus ``report``, ``all``, ``envs``) to ``sub``."""
    for name in BENCHES:
        p = sub.add_parser(name, help=_HELP[name])
        _LazyArguments(name)(p)
        p.set_defaults(bench=name)
    p = sub.add_parser("report", help="rewrite BENCHMARKS.md from bench/results/* (no measuring)")
    p.set_defaults(bench="report")
    p = sub.add_parser("all", help="run every bench with its defaults, then write BENCHMARKS.md")
    p.set_defaults(bench="all")
    p = sub.add_parser("envs", help="create/check the deep-river environment")
    p.set_defaults(bench="envs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="NAME")
    add_subcommands(sub)
    return parser


def dispatch(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    name = args.bench
    if name == "envs":
        from bench.envs import main as envs_main

        return envs_main([])
    if name == "report":
        from bench.report import write_report

        print(write_report())
        return 0
    if name == "all":
        return _run_all(args, argv)
    module = importlib.import_module(f"bench.{name}")
    module.run(args, argv)
    from bench.report import write_report

    print(write_report())
    return 0


# Timing benches first, before the long accuracy grid heats the machine.
ALL_ORDER = ("throughput", "norm_time", "accuracy", "sweep", "gap")


def _run_all(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    for name in ALL_ORDER:
        parser = argparse.ArgumentParser(prog=f"python -m bench {name}")
        importlib.import_module(f"bench.{name}").add_arguments(parser)
        print(f"== {name}", file=sys.stderr)
        importlib.import_module(f"bench.{name}").run(parser.parse_args([]), [name])
    from bench.report import write_report

    print(write_report())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return dispatch(args, argv)
