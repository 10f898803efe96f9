"""Moved to :mod:`stream_trainer.sources.dead_letter_file` (beside the dead-letter protocol); kept
so that imports of the old path keep working."""

from __future__ import annotations

from stream_trainer.sources.dead_letter_file import DeadLetterFile

__all__ = ["DeadLetterFile"]
