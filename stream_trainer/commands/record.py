"""``stream-trainer record``: capture a Kafka topic into a recording file.

    stream-trainer record --bootstrap HOST:PORT --topic T --out FILE.jsonl[.gz]
                          [--from-beginning] [--max-records N | --until-end]
                          [--config FILE.toml] [--kafka-option KEY=VALUE ...]

The recording keeps each message's topic, partition, offset, timestamp, key and value byte for byte
(see :mod:`stream_trainer.sources.recording`). Without ``--max-records`` or ``--until-end`` it runs
until interrupted (Ctrl-C closes the file cleanly). A secured cluster takes the settings of `run`:
the ``[kafka]`` table of ``--config``, ``STREAM_TRAINER_KAFKA__*`` variables, ``--kafka-option``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stream_trainer.commands._kafka_args import add_kafka_arguments, kafka_client_settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "record",
        help="capture a Kafka topic into a recording file",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--bootstrap", required=True, metavar="HOST:PORT")
    p.add_argument("--topic", required=True)
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl[.gz]")
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the earliest retained offset (default: only new messages)",
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--max-records", type=int, metavar="N", help="stop after N messages")
    stop.add_argument(
        "--until-end",
        action="store_true",
        help="stop once the end offsets seen at start are reached",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_kafka_arguments(p, config_file=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from consumers.recorder import record_topic
    from stream_trainer.sources.recording import RecordingWriter

    settings = kafka_client_settings(args)
    count = 0
    with (
        RecordingWriter(args.out, topic=args.topic) as writer,
        tqdm(
            total=args.max_records,
            unit="msg",
            desc=f"record {args.topic}",
            file=sys.stderr,
            disable=args.no_progress,
        ) as bar,
    ):
        try:
            count = record_topic(
                args.bootstrap,
                args.topic,
                writer.write,
                from_beginning=args.from_beginning,
                max_records=args.max_records,
                until_end=args.until_end,
                security=settings.security,
                consumer_options=settings.consumer,
                progress=bar.update,
            )
        except KeyboardInterrupt:
            count = writer.count
    print(f"recorded {count} message(s) from {args.topic} to {args.out}", file=sys.stderr)
    return 0
