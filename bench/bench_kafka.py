"""End-to-end throughput from Kafka through the record source, beside a plain consumer.

For ``max_batch_records`` in 1, 8, 64, 512: samples/s of ``poll_batch`` (decode, checks, optional
trainer step) reading a pre-filled topic, with the consumer in the reading process
(``KafkaRecordSource``) and in a child process (``ProcessKafkaSource``, the service's default), the
trainer alone on the same batches held in memory, and the raw samples/s of a plain kafka-python
consumer that only ``json.loads`` the same messages, all measured in the same run. Each
figure is the median of ``--repeats`` runs; the clock starts at the first non-empty batch (group
join and the first fetch are not counted) and the samples of that first batch are not counted
either. The clock stops once ``--records`` have been read, and the topic holds a tenth more
(:func:`topic_size`): a live stream has no end, and the wait for the last fetches of a finite
topic has nothing to do with a reader's throughput.

    python bench/bench_kafka.py                       # starts a broker (scripts/kafka_broker.py)
    python bench/bench_kafka.py --bootstrap 127.0.0.1:9092 --records 50000

``trainer_step`` is the hook for the lead's trainer: ``run_benchmark(..., trainer_step=fn)`` calls
``fn(batch.records)`` for every batch inside the timed loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402

from consumers.kafka_source import KafkaRecordSource, KafkaSourceConfig  # noqa: E402
from consumers.process.source import open_kafka_source  # noqa: E402
from consumers.topics import create_topic  # noqa: E402
from stream_trainer.records import Record  # noqa: E402

TrainerStep = Callable[[list[Record]], None]
BATCH_CAPS = (1, 8, 64, 512)
ABLATION_CAP = 64
"""The consumer process is also measured reading :data:`ABLATION_READ_AHEAD` batches ahead here."""
ABLATION_READ_AHEAD = 1
"""The read-ahead measured beside the default (``KafkaSourceConfig.read_ahead_batches``)."""
RESULTS = ROOT / "bench" / "results" / "kafka.md"


def _load_broker_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "kafka_broker", ROOT / "scripts" / "kafka_broker.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kafka_broker"] = module
    spec.loader.exec_module(module)
    return module


def bench_value(rng: random.Random, i: int, features: int) -> bytes:
    """Record ``i`` of the benchmark stream: ``features`` floats, one category, a binary label."""
    value: dict[str, object] = {f"f{j}": rng.random() for j in range(features)}
    value["cat"] = f"c{i % 7}"
    value["y"] = i % 2
    return json.dumps(value).encode()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (Linux ``/proc``); None when
    unknown."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def topic_size(records: int) -> int:
    """Records in the benchmark topic: ``records`` are counted, the rest keeps every reader away
    from the end of the topic (module docstring)."""
    return records + max(2_000, records // 10)


def fill_topic(bootstrap: str, topic: str, n: int, partitions: int, features: int) -> None:
    create_topic(bootstrap, topic, partitions)
    rng = random.Random(0)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    for i in range(n):
        producer.send(topic, bench_value(rng, i, features), partition=i % partitions)
    producer.flush()
    producer.close()


def raw_throughput(bootstrap: str, topic: str, n: int, check_crcs: bool = True) -> float:
    """The plain consumer, with the same CRC setting as the source so that both do the same work."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=200,
        check_crcs=check_crcs,
    )
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen, counted, started = 0, 0, 0.0
    try:
        while seen < n:
            polled = consumer.poll(timeout_ms=500, max_records=500)
            got = 0
            for messages in polled.values():
                for m in messages:
                    json.loads(m.value)
                    got += 1
            if got and not started:
                started = time.perf_counter()
            elif got:
                counted += got
            seen += got
        return counted / (time.perf_counter() - started)
    finally:
        consumer.close(autocommit=False)


def source_throughput(
    bootstrap: str,
    topic: str,
    n: int,
    cap: int,
    trainer_step: TrainerStep | None,
    *,
    consumer_process: bool = False,
    read_ahead_batches: int | None = None,
    cpu: dict[str, float] | None = None,
    broker_pid: int | None = None,
) -> float:
    """Samples/s through the source the service would open (``open_kafka_source``): one process,
    or with ``consumer_process`` the consumer in a child process reading ``read_ahead_batches``
    ahead (None: the default).

    With ``cpu``, it receives the CPU time per counted record (µs, over the timed span) of this
    process (``"service"``), of the consumer process when there is one (``"child"``) and of the
    broker when ``broker_pid`` is given (``"broker"``)."""
    config = KafkaSourceConfig(
        bootstrap,
        topic,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        target="y",
        max_batch_records=cap,
        max_wait_ms=200,
        consumer_process=consumer_process,
        **({} if read_ahead_batches is None else {"read_ahead_batches": read_ahead_batches}),
    )
    seen, counted, started = 0, 0, 0.0
    with open_kafka_source(config) as source:
        pids = {"service": os.getpid(), "child": getattr(source, "pid", None), "broker": broker_pid}
        at_start: dict[str, float | None] = {}
        while seen < n:
            batch = source.poll_batch()
            if trainer_step is not None and batch.records:
                trainer_step(batch.records)
            if batch.size and not started:
                started = time.perf_counter()
                at_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
            elif batch.size:
                counted += batch.size
            seen += batch.size
        elapsed = time.perf_counter() - started
        if cpu is not None:
            for name, pid in pids.items():
                now, then = cpu_seconds(pid), at_start.get(name)
                if now is not None and then is not None:
                    cpu[name] = (now - then) / counted * 1e6
        return counted / elapsed


def trainer_alone_throughput(bootstrap: str, topic: str, n: int, cap: int) -> float:
    """The trainer alone on the very batches the source cuts at ``cap`` (fetched first, in memory):
    the bound when training, not Kafka, is the slower side."""
    config = KafkaSourceConfig(
        bootstrap,
        topic,
        group_id=f"bench-{uuid.uuid4().hex[:8]}",
        target="y",
        max_batch_records=cap,
        max_wait_ms=200,
    )
    batches = []
    seen = 0
    with KafkaRecordSource(config) as source:
        while seen < n:
            batch = source.poll_batch()
            if batch.records:
                batches.append(batch.records)
            seen += batch.size
    step = make_trainer_step()
    step(batches[0])  # the first batch builds the model: not counted, as in the other readers
    started = time.perf_counter()
    for records in batches[1:]:
        step(records)
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - started)


def make_trainer_step() -> TrainerStep:
    """A fresh trainer with the default configuration (the service's), one thread."""
    from stream_trainer.threads import pin_threads
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    pin_threads(1)
    trainer = IncrementalTrainer(TrainerConfig(target="y", task="classification"))
    return trainer.step


def run_benchmark(
    bootstrap: str,
    *,
    records: int = 20_000,
    repeats: int = 3,
    partitions: int = 3,
    features: int = 10,
    caps: tuple[int, ...] = BATCH_CAPS,
    trainer_step: TrainerStep | None = None,
    with_trainer: bool = False,
    broker_pid: int | None = None,
) -> dict[str, float]:
    """Return ``{"raw": median samples/s, "source@CAP": ..., "process-source@CAP": ...}``; with
    the trainer also ``e2e@CAP``, ``process-e2e@CAP``, ``trainer@CAP`` (medians) and the medians of
    the runs' own ratios to their bound, ``ratio-one@CAP`` and ``ratio-process@CAP`` (with
    ``-min`` and ``-max``), and at :data:`ABLATION_CAP` the consumer process reading
    :data:`ABLATION_READ_AHEAD` batches ahead (``process-e2e-aheadN@CAP`` and
    ``ratio-aheadN@CAP``, N that number); ``cpu-service@CAP``,
    ``cpu-child@CAP`` (and ``cpu-broker@CAP`` with ``broker_pid``) are the CPU µs per record of the
    consumer process's end to end (:func:`source_throughput`).

    The bound of a run is the slower of that repeat's raw consumer and the mean of the trainer
    alone measured just before and just after the consumer process's run: on a shared machine
    whose speed drifts by tens of percent within minutes, a ratio of two medians taken minutes
    apart moves with the drift; a run's ratio to its own bracket does much less."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    fill_topic(bootstrap, topic, topic_size(records), partitions, features)
    runs: dict[str, list[float]] = {"raw": []}
    check_crcs = KafkaSourceConfig(bootstrap, topic).crc_checked()

    def e2e(
        cap: int,
        in_child: bool,
        read_ahead_batches: int | None = None,
        cpu: dict[str, float] | None = None,
    ) -> float:
        step = make_trainer_step() if trainer_step is None else trainer_step
        return source_throughput(
            bootstrap, topic, records, cap, step, consumer_process=in_child,
            read_ahead_batches=read_ahead_batches, cpu=cpu, broker_pid=broker_pid,
        )  # fmt: skip

    for _ in range(repeats):
        raw = raw_throughput(bootstrap, topic, records, check_crcs)
        runs["raw"].append(raw)
        for cap in caps:
            for prefix, in_child in (("", False), ("process-", True)):
                rate = source_throughput(
                    bootstrap, topic, records, cap, None, consumer_process=in_child
                )
                runs.setdefault(f"{prefix}source@{cap}", []).append(rate)
            if not with_trainer:
                continue
            # The trainer alone brackets the consumer process's end to end (before and after):
            # each run's ratio is to the bound measured around it, seconds apart.
            before = trainer_alone_throughput(bootstrap, topic, records, cap)
            cpu: dict[str, float] = {}
            child = e2e(cap, True, cpu=cpu)
            after = trainer_alone_throughput(bootstrap, topic, records, cap)
            one = e2e(cap, False)
            bound = min(raw, (before + after) / 2)
            measured = {
                "trainer": [before, after],
                "process-e2e": [child],
                "e2e": [one],
                "ratio-process": [child / bound],
                "ratio-one": [one / bound],
                **{f"cpu-{name}": [us] for name, us in cpu.items()},
            }
            if cap == ABLATION_CAP:
                ahead = e2e(cap, True, read_ahead_batches=ABLATION_READ_AHEAD)
                measured[f"process-e2e-ahead{ABLATION_READ_AHEAD}"] = [ahead]
                measured[f"ratio-ahead{ABLATION_READ_AHEAD}"] = [ahead / bound]
            for name, values in measured.items():
                runs.setdefault(f"{name}@{cap}", []).extend(values)
    out = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        if name.startswith("ratio-"):
            out[f"{name}-min"], out[f"{name}-max"] = min(values), max(values)
    return out


def crc_mode() -> str:
    config = KafkaSourceConfig("127.0.0.1:9092", "t")
    if config.crc_checked():
        return "on (kafka-python uses the `crc32c` C extension)"
    return (
        "off (the default without the `crc32c` C extension: kafka-python's pure-Python check "
        "costs more per record than a training step)"
    )


def _caps_of(medians: dict[str, float], prefix: str) -> list[str]:
    """The batch caps of the figures named ``PREFIX CAP`` (``"e2e@"`` -> ``["1", "8", ...]``)."""
    return [name.split("@")[1] for name in medians if name.startswith(prefix)]


def write_results(path: Path, medians: dict[str, float], args: argparse.Namespace) -> str:
    raw = medians["raw"]
    lines = [
        "# Kafka source throughput",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`",
        f"- machine: `{' '.join(platform.uname())}`, nproc {os.cpu_count()}",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- broker: Apache Kafka {args.kafka_version} (KRaft, single node, 127.0.0.1), "
        f"{args.partitions} partitions",
        f"- {args.records} records counted (of {topic_size(args.records)} in the topic) of "
        f"{args.features} float features + 1 categorical + label, "
        f"median of {args.repeats} runs; one torch thread; trainer: `TrainerConfig()` defaults",
        f"- record CRC-32C check (`check_crcs`, both consumers): {crc_mode()}",
        "",
        "| reader | max_batch_records | samples/s | vs raw |",
        "|---|---:|---:|---:|",
        f"| plain KafkaConsumer + json.loads | 500 (poll) | {raw:,.0f} | 1.00 |",
    ]
    readers = (
        ("source@", "KafkaRecordSource, one process (decode + checks)"),
        ("process-source@", "consumer process (`consumer_process: true`)"),
    )
    for prefix, label in readers:
        for name, rate in medians.items():
            if name.startswith(prefix):
                cap = name.split("@")[1]
                lines.append(f"| {label} | {cap} | {rate:,.0f} | {rate / raw:.2f} |")
    caps = _caps_of(medians, "e2e@")
    if caps:
        lines += [
            "",
            "End to end, Kafka -> source -> IncrementalTrainer.step, with the consumer in the",
            "service's process and in a child process (`consumer_process`), beside the trainer",
            "alone on the same batches held in memory (same run; samples/s are medians). A run's",
            "*bound* is the slower of the raw consumer and the trainer alone measured just before",
            "and after it; the ratios are the medians of the runs' own ratios to their bound",
            "(min-max over the runs in brackets). The target at 64 is e2e >= 0.8 of the bound.",
            "",
            "| max_batch_records | e2e, one process | e2e, consumer process | trainer alone"
            " | raw consumer | bound | one process / bound | consumer process / bound |",
            "|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for cap in caps:
            e2e, alone = medians[f"e2e@{cap}"], medians[f"trainer@{cap}"]
            child = medians[f"process-e2e@{cap}"]
            which = "trainer" if alone < raw else "Kafka"
            spread = (
                f"{medians[f'ratio-process@{cap}']:.2f} "
                f"({medians[f'ratio-process@{cap}-min']:.2f}-"
                f"{medians[f'ratio-process@{cap}-max']:.2f})"
            )
            lines.append(
                f"| {cap} | {e2e:,.0f} | {child:,.0f} | {alone:,.0f} | {raw:,.0f} | {which} "
                f"| {medians[f'ratio-one@{cap}']:.2f} | {spread} |"
            )
    cpu_caps = _caps_of(medians, "cpu-service@")
    if cpu_caps:
        lines += [
            "",
            "CPU time per record of the consumer process's end to end (median of the runs, µs over",
            "the timed span; `/proc`), beside the trainer alone's wall time per record:",
            "",
            "| max_batch_records | service process | consumer process | broker | trainer alone |",
            "|---:|---:|---:|---:|---:|",
        ]
        for cap in cpu_caps:
            broker = medians.get(f"cpu-broker@{cap}")
            lines.append(
                f"| {cap} | {medians[f'cpu-service@{cap}']:.1f} "
                f"| {medians[f'cpu-child@{cap}']:.1f} "
                f"| {'n/a' if broker is None else f'{broker:.1f}'} "
                f"| {1e6 / medians[f'trainer@{cap}']:.1f} |"
            )
    n = ABLATION_READ_AHEAD
    ahead = medians.get(f"process-e2e-ahead{n}@{ABLATION_CAP}")
    if ahead is not None:
        default = KafkaSourceConfig("127.0.0.1:9092", "t").read_ahead_batches
        lines += [
            "",
            f"Read-ahead at {ABLATION_CAP} (consumer process, same runs): {n} batch(es) ahead "
            f"{ahead:,.0f}/s, {medians[f'ratio-ahead{n}@{ABLATION_CAP}']:.2f} of the bound; "
            f"{default} (the default) {medians[f'process-e2e@{ABLATION_CAP}']:,.0f}/s, "
            f"{medians[f'ratio-process@{ABLATION_CAP}']:.2f}.",
        ]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="use this broker (default: start one)")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--no-trainer", action="store_true", help="measure the source only (no trainer step)"
    )
    parser.add_argument(
        "--broker-pid", type=int, help="with --bootstrap: the broker's pid, to report its CPU time"
    )
    args = parser.parse_args(argv)
    broker_script = _load_broker_script()
    args.kafka_version = broker_script.KAFKA_VERSION
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = broker_script.KafkaBroker(tempfile.mkdtemp(prefix="bench-kafka-"))
        broker.start()
        bootstrap = broker.bootstrap
        args.broker_pid = broker.pid
    try:
        medians = run_benchmark(
            bootstrap,
            records=args.records,
            repeats=args.repeats,
            partitions=args.partitions,
            features=args.features,
            with_trainer=not args.no_trainer,
            broker_pid=args.broker_pid,
        )
    finally:
        if broker is not None:
            broker.stop(timeout_s=5)
    print(write_results(args.out, medians, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
