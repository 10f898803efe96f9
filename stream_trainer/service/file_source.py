"""Moved to :mod:`stream_trainer.sources.file_batches` (beside the source protocol); kept so that
imports of the old path keep working."""

from __future__ import annotations

from stream_trainer.sources.file_batches import FileBatch, FileBatchSource

__all__ = ["FileBatch", "FileBatchSource"]
