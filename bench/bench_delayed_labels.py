"""Throughput of the delayed-label service against the inline-label service, in the same run.

Both services learn the same ``--records`` records (``--features`` float features, a binary
label), in batches of ``--batch-sizes`` records (default ``1:64``, the same seeded schedule):

- *inline*: each record carries its label (the default ``labels_source``);
- *delayed*: each record carries an id and no label, and its label comes as a record ``{id, y}``
  uniformly 0 to ``2 x --mean-delay`` records later, in the batch where it falls due
  (``labels_source = "source"``): the service predicts the record, keeps its encoded row, and
  learns it when the label arrives. A delayed batch is thus its records plus the labels that came
  with them.

The batches come from an in-memory :class:`~stream_trainer.sources.protocol.BatchSource` (records
already decoded, as the Kafka source hands them out), so the figure is the service loop's own
cost: screening, predicting, joining, learning, dead letters, metrics, the final checkpoint. A run
is one :class:`~stream_trainer.service.TrainerService` in this process (metrics not served, one
checkpoint at the end in a temporary directory) and its figure is labelled samples learned per
second of :meth:`~stream_trainer.service.TrainerService.run`. Rounds alternate inline and delayed,
after one warm-up run of each; each figure is the median over ``--repeats`` rounds, and the ratio
delayed / inline is taken per round (median, min-max). Also given: messages per second (a delayed
run handles a label message per record besides).

    python bench/bench_delayed_labels.py
    python bench/bench_delayed_labels.py --records 5000 --repeats 3 --out /tmp/delayed.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "delayed_labels.md"


Batches = list[list[dict[str, Any]]]


def batches(
    records: int, features: int, mean_delay: int, batch_sizes: str, seed: int
) -> tuple[Batches, Batches]:
    """The inline batches and the delayed ones (record values) of the same records and labels."""
    from stream_trainer.sources import BatchSizes

    rng = random.Random(seed)
    sizes = BatchSizes.parse(batch_sizes).sizes(seed)
    inline: Batches = []
    delayed: Batches = []
    due: list[tuple[int, int, dict[str, Any]]] = []  # (position due, id, label record)
    i = 0
    while i < records:
        chunk_inline: list[dict[str, Any]] = []
        chunk_delayed: list[dict[str, Any]] = []
        for _ in range(min(next(sizes), records - i)):
            x = [rng.gauss(0.0, 1.0) for _ in range(features)]
            y = int(sum(x[: max(1, features // 2)]) > 0)
            value: dict[str, Any] = {f"f{j}": v for j, v in enumerate(x)}
            chunk_inline.append({**value, "y": y})
            chunk_delayed.append({"id": i, **value})
            due.append((i + rng.randint(0, 2 * mean_delay), i, {"id": i, "y": y}))
            i += 1
        due.sort(key=lambda d: d[:2])
        while due and due[0][0] < i:
            chunk_delayed.append(due.pop(0)[2])
        inline.append(chunk_inline)
        delayed.append(chunk_delayed)
    if due:
        delayed.append([label for _, _, label in due])
    return inline, delayed


class MemoryBatches:
    """A :class:`~stream_trainer.sources.protocol.BatchSource` over batches held in memory (one
    partition, ``memory:0``; nothing to commit to)."""

    def __init__(self, values: Batches) -> None:
        from stream_trainer.records import Record
        from stream_trainer.sources.file_batches import FileBatch

        self._batches: list[Any] = []
        offset = 0
        for chunk in values:
            batch = FileBatch()
            for value in chunk:
                batch.records.append(
                    Record(dict(value), topic="memory", partition=0, offset=offset)
                )
                offset += 1
            batch.next_offsets["memory:0"] = offset
            self._batches.append(batch)
        self._next = 0

    def poll_batch(self) -> Any:
        from stream_trainer.sources.file_batches import FileBatch

        if self._next >= len(self._batches):
            return FileBatch()
        self._next += 1
        return self._batches[self._next - 1]

    def commit(self, next_offsets: Any, metadata: Any = None) -> None:
        pass

    def committed_offsets(self) -> dict[str, int]:
        return {}

    def committed_metadata(self) -> dict[str, tuple[int, str]]:
        return {}

    def end_offsets(self) -> dict[str, int]:
        return {}

    def lag(self) -> dict[str, int]:
        return {}

    def caught_up(self, end_offsets_at_start: Any) -> bool:
        return self._next >= len(self._batches)

    def close(self) -> None:
        self._next = len(self._batches)


def run_service(values: Batches, work: Path, *, delayed: bool, seed: int) -> dict:
    """One service run over the batches ``values``; its final report."""
    from stream_trainer.service import TrainerService, load_service_config
    from stream_trainer.sources.dead_letter_file import DeadLetterFile

    source = MemoryBatches(values)

    class _Service(TrainerService):
        def _open_source(self) -> None:
            self.source = source
            self.dead_letters = DeadLetterFile(work / "dead.jsonl")

    flags: dict[str, Any] = {
        "source": "memory",
        "checkpoint": f"file://{work / 'checkpoints'}",
        "checkpoint_every_records": 10**9,
        "checkpoint_every_seconds": 1e9,
        "metrics_address": "off",
        "progress": False,
    }
    if delayed:
        flags["labels_source"] = "source"
    config = load_service_config(
        flags=flags,
        trainer_flags={"target": "y", "task": "classification", "seed": seed},
        environ={},
    )
    return _Service(config).run()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    values = dict(
        zip(
            ("inline", "delayed"),
            batches(args.records, args.features, args.mean_delay, args.batch_sizes, args.seed),
            strict=True,
        )
    )
    messages = {kind: sum(len(chunk) for chunk in chunks) for kind, chunks in values.items()}
    rows: dict[str, list[float]] = {"inline": [], "delayed": []}
    accuracy: dict[str, list[float]] = {"inline": [], "delayed": []}
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-delayed-") as tmp:
        base = Path(tmp)
        for kind in ("inline", "delayed"):  # warm-up (compiled kernels, caches): not counted
            run_service(values[kind], base / f"{kind}-warm-up", delayed=kind == "delayed",
                        seed=args.seed)  # fmt: skip
        for round_ in range(args.repeats):
            rate: dict[str, float] = {}
            order = ("inline", "delayed") if round_ % 2 == 0 else ("delayed", "inline")
            for kind in order:
                work = base / f"{kind}-{round_}"
                report = run_service(values[kind], work, delayed=kind == "delayed", seed=args.seed)
                if report["samples"] != args.records:
                    raise SystemExit(f"{kind}: learned {report['samples']} of {args.records}")
                rate[kind] = report["samples_per_second"]
                rows[kind].append(rate[kind])
                accuracy[kind].append(report["accuracy"])
                print(f"round {round_} {kind}: {rate[kind]:.0f} samples/s", file=sys.stderr)
            ratios.append(rate["delayed"] / rate["inline"])
    return {"rates": rows, "accuracy": accuracy, "ratios": ratios, "messages": messages}


def render(args: argparse.Namespace, argv: list[str], result: dict[str, Any]) -> str:
    import torch

    rates, ratios = result["rates"], result["ratios"]
    per = {kind: n / args.records for kind, n in result["messages"].items()}  # messages/sample
    command = "python bench/bench_delayed_labels.py" + (" " + shlex.join(argv) if argv else "")
    lines = [
        "# Delayed labels: service throughput against inline labels",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}",
        f"- machine: `{' '.join(platform.uname())}`, torch {torch.__version__}",
        f"- {args.records} records of {args.features} float features, binary label, in batches "
        f"of {args.batch_sizes} records (seed {args.seed}); delayed: each label a record of its "
        f"own, 0 to {2 * args.mean_delay} records late, in the batch where it falls due "
        "(`labels_source = source`); batches from memory (decoded), through the service loop",
        "- samples/s = labelled samples learned per second of `TrainerService.run()`; messages/s "
        "counts the label messages too; rounds alternate the two services after a warm-up run "
        f"of each; medians of {args.repeats} rounds; ratio per round (target >= 0.8)",
        "",
        "| batch sizes | inline samples/s | delayed samples/s | delayed / inline | "
        "inline messages/s | delayed messages/s | inline accuracy | delayed accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {args.batch_sizes} | {statistics.median(rates['inline']):.0f} | "
        f"{statistics.median(rates['delayed']):.0f} | {statistics.median(ratios):.2f} "
        f"({min(ratios):.2f}-{max(ratios):.2f}) | "
        f"{statistics.median(rates['inline']) * per['inline']:.0f} | "
        f"{statistics.median(rates['delayed']) * per['delayed']:.0f} | "
        f"{statistics.median(result['accuracy']['inline']):.4f} | "
        f"{statistics.median(result['accuracy']['delayed']):.4f} |",
        "",
        "The delayed service scores the prediction it served when the record arrived, so its "
        "accuracy is that of a model that had not yet learned the labels still in flight.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--mean-delay", type=int, default=64, help="mean label delay, records")
    parser.add_argument("--batch-sizes", default="1:64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = measure(args)
    shown = [a for a in argv if not a.startswith("--out")]
    if "--out" in argv:
        i = argv.index("--out")
        shown = argv[:i] + argv[i + 2 :]
    text = render(args, shown, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
