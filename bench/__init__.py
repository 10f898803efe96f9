"""Benchmarks of stream-trainer that write ``BENCHMARKS.md`` and the plots under ``docs/``.

Run ``python -m bench NAME`` or ``stream-trainer bench NAME`` (see :mod:`bench.cli` for the names).
Modules import torch, river and stream_trainer inside their functions only, so listing the
commands stays fast. ``bench_kafka.py`` and ``bench_checkpoint.py`` are standalone scripts whose
Markdown results are quoted as they are.
"""
