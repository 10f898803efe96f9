"""The ``stream-trainer`` command: one sub-command per module in :mod:`stream_trainer.commands`.

Each command module exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a
callable taking the parsed namespace and returning the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stream_trainer.errors import StreamTrainerError

__all__ = ["build_parser", "main"]

COMMANDS = ("evaluate", "run", "record", "replay", "checkpoints", "bench", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-trainer",
        description="Online learning from streams with stream-safe normalization layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stream_trainer.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StreamTrainerError as exc:
        print(f"stream-trainer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
