"""``stream-trainer export --checkpoint URL --out FILE``: the served model as TorchScript.

The checkpoint is loaded through every check the service runs before it restores one (checksum,
signature, structural validation, the trainer rebuilt:
:func:`~stream_trainer.service.restore.restore_checkpoint`): the newest version that passes them,
or ``--version N`` (refused, with the reason, when it fails them). ``FILE`` gets the TorchScript
archive (``torch.jit.load(FILE)``; it takes the input columns, not records:
:mod:`stream_trainer.training.served_model`), ``FILE.json`` the metadata: input columns in order,
task, classes, checkpoint version. ONNX is not offered: torch's exporter needs the ``onnx`` and
``onnxscript`` packages, which stream-trainer does not depend on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stream_trainer.checkpoints.urls import ACCEPTED_FORMS
from stream_trainer.errors import CheckpointError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write the served model of a checkpoint as TorchScript (+ JSON metadata)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="URL", help=" | ".join(ACCEPTED_FORMS))
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="TorchScript archive")
    p.add_argument("--version", type=int, metavar="N", help="version (default: the newest valid)")
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from stream_trainer.checkpoints import open_store
    from stream_trainer.service.restore import restore_checkpoint
    from stream_trainer.training.served_model import export_torchscript

    with open_store(args.checkpoint) as store:
        if args.version is None:
            restored = store.load_newest(restore_checkpoint)
            if restored is None:
                raise CheckpointError(f"no checkpoint in {args.checkpoint}", retriable=False)
            checkpoint, trainer = restored.checkpoint, restored.value
        else:
            checkpoint = store.load(args.version)
            trainer = restore_checkpoint(checkpoint)
    metadata = export_torchscript(
        trainer, args.out, extra={"checkpoint_version": checkpoint.version}
    )
    summary = {
        "out": str(args.out),
        "metadata": f"{args.out}.json",
        "checkpoint_version": checkpoint.version,
        "task": metadata["task"],
        "classes": metadata["classes"],
        "input_columns": len(metadata["input_columns"]),
        "samples_seen": metadata["samples_seen"],
    }
    print(json.dumps(summary))
    return 0
