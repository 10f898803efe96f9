"""``stream-trainer replay``: produce a recording, or any source, into a Kafka topic.

    stream-trainer replay SOURCE --bootstrap HOST:PORT --topic T
                          [--speed X | --rate N | --max-speed] [--partitions P] [--create-topic]
                          [--key-field F] [--loop] [--config FILE.toml]
                          [--kafka-option KEY=VALUE ...]

A recording (made by ``stream-trainer record``) is replayed with its keys, values and partitions,
and with its inter-arrival times scaled by ``1/X`` (``--speed 1``, real time, is the default).
Any other source that ``stream-trainer evaluate`` reads (CSV, ARFF, JSONL, ``river:NAME``,
``synth:NAME?seed=S``) is produced as JSON objects, round-robin over the partitions, or keyed by
``--key-field``, as fast as possible unless ``--rate`` is given. ``--create-topic`` creates a
missing topic with ``--partitions`` partitions (default: as many as the recording uses, else 1).
``--loop`` replays the source again and again until interrupted, keeping a recording's pace
(timestamps shifted forward each pass) or ``--rate`` across passes; it needs a pace (a
recording's ``--speed``, or ``--rate``). A secured cluster takes the settings of `run`: the
``[kafka]`` table of ``--config``, ``STREAM_TRAINER_KAFKA__*`` variables, ``--kafka-option``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from stream_trainer.commands._kafka_args import add_kafka_arguments, kafka_client_settings

__all__ = ["register"]


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    return _positive(text.removesuffix("/s"))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="produce a recording or a file/bundled source into a Kafka topic",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("source", metavar="SOURCE", help="recording, CSV/ARFF/JSONL, river:NAME, synth:")
    p.add_argument("--bootstrap", required=True, metavar="HOST:PORT")
    p.add_argument("--topic", required=True)
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive, metavar="X", help="time scale for recordings")
    pace.add_argument("--rate", type=_rate, metavar="N/s", help="fixed messages per second")
    pace.add_argument("--max-speed", action="store_true", help="no pacing")
    p.add_argument("--partitions", type=int, metavar="P", help="partitions of a created topic")
    p.add_argument("--create-topic", action="store_true", help="create the topic when missing")
    p.add_argument("--key-field", metavar="F", help="key non-recording records by this field")
    p.add_argument(
        "--loop",
        action="store_true",
        help="replay the source forever (until interrupted) at a steady pace: a recording's "
        "--speed, or --rate; a demo that keeps flowing",
    )
    p.add_argument("--target", help="label field of the source (passed to the source reader)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_kafka_arguments(p, config_file=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from consumers.producer import Pacer, TopicProducer, looped, replay_entries, replay_records
    from stream_trainer.errors import ConfigError
    from stream_trainer.sources.recording import is_recording, read_recording

    if args.partitions is not None and args.partitions < 1:
        raise ConfigError(f"--partitions must be >= 1, got {args.partitions}")
    recording = Path(args.source).is_file() and is_recording(args.source)
    total: int | None = None
    partitions = args.partitions
    if recording:
        total, used = 0, 0
        for entry in read_recording(args.source):
            total += 1
            used = max(used, entry.partition + 1)
        partitions = partitions or max(1, used)
        speed = None if args.max_speed or args.rate else (args.speed or 1.0)
    else:
        speed = args.speed
    if args.loop and args.rate is None and (speed is None or not recording):
        raise ConfigError(
            "--loop needs a steady pace: --rate N/s (or --speed X for a recording); "
            "without one it would flood the topic forever"
        )
    pacer = Pacer(speed=speed, rate=args.rate)
    settings = kafka_client_settings(args)

    with (
        TopicProducer(
            args.bootstrap,
            args.topic,
            create_missing=args.create_topic,
            partitions=partitions or 1,
            security=settings.security,
            producer_options=settings.producer,
        ) as producer,
        tqdm(
            total=None if args.loop else total,
            unit="msg",
            desc=f"replay -> {args.topic}",
            file=sys.stderr,
            disable=args.no_progress,
        ) as bar,
    ):
        passes = None if args.loop else 1
        if recording:
            report = replay_entries(
                looped(lambda: read_recording(args.source), passes=passes),
                producer,
                pacer,
                progress=bar.update,
            )
        else:
            from stream_trainer.sources import open_source

            report = replay_records(
                looped(lambda: open_source(args.source, target=args.target), passes=passes),
                producer,
                pacer,
                key_field=args.key_field,
                progress=bar.update,
            )
    skipped = f", skipped {report.skipped}" if report.skipped else ""
    print(
        f"replayed {report.sent} message(s) to {args.topic} in {report.elapsed_s:.1f} s{skipped}",
        file=sys.stderr,
    )
    return 0
