"""The ``stream-trainer`` command: one sub-command per module in :mod:`stream_trainer.commands`.

Each command module (named in :data:`COMMANDS`) exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (a callable taking the parsed namespace and returning the exit code).
Building the parser imports every command module, so a command module imports at its top only what
its flags need (argparse, :mod:`stream_trainer.errors`, configuration constants) and loads torch,
numpy, river, kafka, redis and prometheus inside ``func``: ``--help`` and ``--version`` answer
without them (``tests/test_cli_startup.py`` checks it for every command).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from stream_trainer.errors import StreamTrainerError

__all__ = ["build_parser", "main"]

COMMANDS = ("evaluate", "run", "record", "replay", "checkpoints", "bench", "export")


class _VersionAction(argparse.Action):
    """``--version``: print ``stream-trainer VERSION`` (the installed metadata) and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS, help="print the version and exit")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        import stream_trainer

        print(f"{parser.prog} {stream_trainer.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-trainer",
        description="Online learning from streams with stream-safe normalization layers.",
    )
    parser.add_argument("--version", action=_VersionAction)
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
