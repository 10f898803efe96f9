"""What a batch costs on each side of the consumer process's pipe (no broker needed).

For batches of the Kafka benchmark's records (10 floats, 1 category, 1 label), microseconds per
record, median of ``--repeats`` timings of ``--loops`` calls each:

- *one process*: ``decode_batch``, what ``KafkaRecordSource.poll_batch`` does after polling (the
  fast path, ``RecordDecoder.accept_plain``, reads with orjson);
- *reference decode*: the same records through the reference path
  (``decode_json_record`` + ``check_values``, Python's ``json``), every record's exact checks;
  the same-run baseline for the fast path;
- *child*: ``pack_polled`` and ``write_frame``, what the consumer process does after polling;
- *service*: ``read_frame`` and ``unpack_batch``, all the service does per batch.

    python bench/bench_frames.py            # writes bench/results/frames.md
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, md_table, write_script_result  # noqa: E402
from bench.bench_kafka import bench_value  # noqa: E402
from consumers.deserializer import RecordDecoder, _Message  # noqa: E402
from consumers.kafka_source import decode_batch  # noqa: E402
from consumers.process.frames import (  # noqa: E402
    pack_polled,
    read_frame,
    unpack_batch,
    write_frame,
)


def _per_record_us(action: Callable[[], object], records: int, loops: int, repeats: int) -> float:
    times = timeit.repeat(action, number=loops, repeat=repeats)
    return statistics.median(times) / loops / records * 1e6


def measure(size: int, loops: int, repeats: int) -> dict[str, float]:
    rng = random.Random(0)
    messages = [
        _Message(bench_value(rng, i, 10), None, "bench", 0, i, 1_700_000_000_000, [])
        for i in range(size)
    ]
    polled = [("bench", 0, messages)]
    decoder = RecordDecoder("y")
    ends = {"bench:0": size}

    def reference() -> list[object]:
        check = decoder._decode_checked
        return [
            check(m.value, m.key, m.topic, m.partition, m.offset, m.timestamp, ()) for m in messages
        ]

    def child() -> bytes:
        fields, blob = pack_polled(decoder, polled, ends)
        pipe = io.BytesIO()
        write_frame(pipe, {"type": "batch", **fields}, blob)
        return pipe.getvalue()

    frame = child()

    def service() -> object:
        return unpack_batch(*read_frame(io.BytesIO(frame)))

    def timed(action: Callable[[], object]) -> float:
        return _per_record_us(action, size, loops, repeats)

    return {
        "frame bytes (whole batch)": float(len(frame)),
        "one process: decode_batch": timed(lambda: decode_batch(decoder, polled, ends)),
        "reference decode (json, every check)": timed(reference),
        "child: pack_polled + write_frame": timed(child),
        "service: read_frame + unpack_batch": timed(service),
    }


def _cell(name: str, value: float) -> str:
    return f"{value:,.0f}" if name.startswith("frame bytes") else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,512")
    parser.add_argument("--loops", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "frames.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {size: measure(size, args.loops, args.repeats) for size in sizes}
    names = list(next(iter(results.values())))
    write_script_result(
        "bench/bench_frames.py",
        argv,
        args.out,
        "Consumer-process frames: cost per record on each side of the pipe",
        [
            f"- 10 floats + 1 category + label per record; median of {args.repeats} timings of "
            f"{args.loops} calls; µs per record (the frame's size: bytes of the whole batch, "
            "header and blob, as the child writes it to the pipe)",
            "",
            md_table(
                ["step", *(f"batch {s}" for s in sizes)],
                [[name, *(_cell(name, results[s][name]) for s in sizes)] for name in names],
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
