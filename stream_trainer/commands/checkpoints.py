"""``stream-trainer checkpoints list|show|verify --checkpoint URL``: inspect a checkpoint store.

``list`` and ``verify`` run every check the service runs before it restores a version (checksum,
signature, the state's structural validation, the trainer rebuilt:
:func:`~stream_trainer.service.restore.restore_checkpoint`), so a version they call ok is one
``run`` would restore; a version that fails is shown with its reason, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING, Any

from stream_trainer.checkpoints.urls import ACCEPTED_FORMS, open_store
from stream_trainer.errors import CheckpointError

if TYPE_CHECKING:
    from stream_trainer.checkpoints.store import CheckpointInfo, VerifyResult, VersionedStore

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "checkpoints",
        help="list, show or verify stored checkpoints",
        description="Inspect a checkpoint store. Tensor values are never printed.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, helptext, handler in (
        ("list", "every kept version with its metadata and checksum status", _list),
        ("show", "metadata and tensor names/shapes/dtypes of one version", _show),
        (
            "verify",
            "full check of one version (or --all); exit code 1 when one fails",
            _verify,
        ),
    ):
        action = actions.add_parser(name, help=helptext, description=helptext)
        action.add_argument(
            "--checkpoint", required=True, metavar="URL", help=" | ".join(ACCEPTED_FORMS)
        )
        if name != "list":
            action.add_argument(
                "--version", type=int, metavar="N", help="version (default: the latest)"
            )
        if name == "verify":
            action.add_argument("--all", action="store_true", help="every kept version")
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(func=handler)


def check_version(store: VersionedStore, version: int) -> VerifyResult:
    """Every check the service runs before restoring ``version`` (module docstring)."""
    from stream_trainer.service.restore import restore_checkpoint

    return store.verify(version, validate=restore_checkpoint)


def _list(args: argparse.Namespace) -> int:
    with open_store(args.checkpoint) as store:
        try:
            latest = store.latest_version()
        except CheckpointError as exc:
            if exc.retriable:
                raise
            print(f"the latest pointer is unreadable: {exc}")
            latest = None
        rows = []
        for info in store.list_versions():
            result = check_version(store, info.version)
            rows.append(
                {
                    **_info_dict(info),
                    "latest": info.version == latest,
                    "checksum": "ok" if result.ok else "FAILED",
                    "error": info.error or result.error,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints in {args.checkpoint}")
        return 0
    header = (
        "version",
        "size",
        "created",
        "samples",
        "step",
        "writer/epoch",
        "checksum",
        "offsets",
    )
    table = [header]
    for row in rows:
        mark = "*" if row["latest"] else ""
        table.append(
            (
                f"{row['version']}{mark}",
                _size(row["size_bytes"]),
                _time(row["created_at"]),
                str(row["samples"]),
                str(row["step"]),
                f"{row['writer_id']}/{row['epoch']}",
                row["checksum"],
                _offsets(row["offsets"]),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    for row in rows:
        if row["error"]:
            print(f"version {row['version']}: {row['error']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    with open_store(args.checkpoint) as store:
        version = _pick(store, args.version)
        if version is None:
            return 1
        checkpoint = store.load(version)
        result = store.verify(version)
    tensors = {
        name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        for name, tensor in sorted(checkpoint.tensors.items())
    }
    document: dict[str, Any] = {
        "version": checkpoint.version,
        "format_version": checkpoint.format_version,
        "created_at": checkpoint.created_at,
        "samples": checkpoint.samples,
        "step": checkpoint.step,
        "offsets": checkpoint.offsets,
        "writer_id": checkpoint.writer_id,
        "epoch": checkpoint.epoch,
        "config_fingerprint": checkpoint.config_fingerprint,
        "size_bytes": result.size_bytes,
        "signed": result.signed,
        "state_keys": sorted(checkpoint.state),
        "tensors": tensors,
    }
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    for key, value in document.items():
        if key not in ("tensors", "offsets"):
            print(f"{key}: {value}")
    print(f"offsets (next to read): {_offsets(checkpoint.offsets)}")
    print(f"tensors ({len(tensors)}):")
    for name, spec in tensors.items():
        print(f"  {name}  {spec['dtype']}  {tuple(spec['shape'])}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with open_store(args.checkpoint) as store:
        if args.all:
            versions = [info.version for info in store.list_versions()]
            if not versions:
                print("no checkpoint has been saved in this store")
                return 1
        else:
            version = _pick(store, args.version)
            if version is None:
                return 1
            versions = [version]
        results = [check_version(store, version) for version in versions]
    if args.json:
        documents = [result.__dict__ for result in results]
        print(json.dumps(documents if args.all else documents[0], indent=2))
    for result in [] if args.json else results:
        if result.ok:
            signature = "signature checked" if result.signature_checked else "no signature check"
            print(f"version {result.version}: ok ({_size(result.size_bytes)}, {signature})")
        else:
            print(f"version {result.version}: FAILED: {result.error}")
    return 0 if all(result.ok for result in results) else 1


def _pick(store: VersionedStore, version: int | None) -> int | None:
    if version is not None:
        return version
    latest = store.latest_version()
    if latest is None:
        print("no checkpoint has been saved in this store")
    return latest


def _info_dict(info: CheckpointInfo) -> dict[str, Any]:
    return dict(info.__dict__)


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f} GiB"


def _time(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _offsets(offsets: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(offsets.items())) or "-"
