"""Delayed labels against a real Kafka broker: features and labels on two topics, labels late at
random and out of order, some never arriving, hostile ones among them, and the trainer killed with
SIGKILL while it works (``python -m stream_trainer run --labels-source kafka://...``).

The ledger at the end: the batch log (truncated at each restart to what the restored checkpoint
covers) lists every label learned exactly once, every labelled record is learned, every record
whose label never came is counted expired, the hostile labels are counted once each by reason, and
Kafka's committed offsets of both topics are the checkpoint's.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from stream_trainer.checkpoints import open_store
from tests.fixtures.kafka import end_offsets, group_offsets, read_topic
from tests.fixtures.service import service_env, uncheckpointed_steps, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 5.0  # record time a row waits for its label
STEP_MS = 20  # record time between two features records
MAX_DELAY_MS = 2000


def _events(n: int, seed: int) -> tuple[list[tuple[str, dict[str, Any], int]], dict[str, Any]]:
    """The messages in the order they are produced: ``(side, value, timestamp_ms)``; and what the
    ledger must show."""
    rng = random.Random(seed)
    t0 = int(time.time() * 1000)
    timed: list[tuple[float, str, dict[str, Any], int]] = []
    labelled: set[int] = set()
    ids = list(range(n))
    bad = set(rng.sample(ids, 10))
    duplicated = set(rng.sample([i for i in ids if i not in bad], 10))
    for i in ids:
        x1, x2 = rng.gauss(0, 1), rng.gauss(0, 1)
        ts = t0 + STEP_MS * i
        timed.append((ts, "features", {"id": i, "x1": x1, "x2": x2}, ts))
        if i not in bad | duplicated and rng.random() < 0.15:
            continue  # this label never comes
        labelled.add(i)
        label = {"id": i, "label": int(x1 + x2 > 0)}
        late = ts + rng.randint(0, MAX_DELAY_MS)
        if i in bad:  # a bad target first (refused), the good one after it
            timed.append(
                (late - 1 + rng.random() * 300, "labels", {"id": i, "label": 1.5}, late - 1)
            )
        if i in duplicated:  # the label twice
            timed.append((late + 400 + rng.random() * 300, "labels", label, late + 400))
        # out of order: each label is produced up to 300 ms of record time off its place
        timed.append((late + rng.random() * 300, "labels", label, late))
    end = t0 + STEP_MS * n
    for k in range(5):  # labels of ids that never exist
        ts = t0 + rng.randrange(STEP_MS * n)
        timed.append((ts, "labels", {"id": 1_000_000 + k, "label": 1}, ts))
    timed.sort(key=lambda e: e[0])
    # Sentinels far ahead in record time: every row and waiting label before them is due.
    timed.append((end + 60_000, "features", {"id": "end", "x1": 0.0, "x2": 0.0}, end + 60_000))
    timed.append((end + 60_000, "labels", {"id": "end-label", "label": 1}, end + 60_000))
    events = [(side, value, ts) for _, side, value, ts in timed]
    first: dict[int, Any] = {}
    for side, value, _ in events:
        if side == "labels" and value["id"] in bad:
            first.setdefault(value["id"], value["label"])
    expect = {
        "labelled": labelled,
        "n": n,
        "bad": len(bad),
        # a bad label read after its good one is refused as the duplicate it also is
        "bad_first": sum(label == 1.5 for label in first.values()),
        "duplicated": len(duplicated),
    }
    return events, expect


class Producer:
    def __init__(self, bootstrap: str, topics: dict[str, str]) -> None:
        self.topics = topics
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)

    def produce(self, events: list[tuple[str, dict[str, Any], int]], pause_every: int = 0) -> None:
        for k, (side, value, ts) in enumerate(events):
            self._producer.send(self.topics[side], json.dumps(value).encode(), timestamp_ms=ts)
            if pause_every and k % pause_every == pause_every - 1:
                self._producer.flush(timeout=30)
                time.sleep(0.02)
        self._producer.flush(timeout=30)

    def in_background(self, events: list[tuple[str, dict[str, Any], int]]) -> threading.Thread:
        thread = threading.Thread(target=self.produce, args=(events, 40))
        thread.start()
        return thread

    def close(self) -> None:
        self._producer.close(timeout=10)


@pytest.mark.slow
def test_delayed_labels_on_a_second_topic_are_learned_exactly_once_across_sigkills(
    kafka_bootstrap: str, kafka_topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    seed, kills = 17, 3
    rng = random.Random(seed)
    features = kafka_topic_factory(1, "-features")
    labels = kafka_topic_factory(1, "-labels")
    dead = kafka_topic_factory(1, "-dead")
    predictions = kafka_topic_factory(1, "-predictions")
    group = f"{features}-group"
    checkpoint_url = f"file://{tmp_path / 'checkpoints'}"
    batch_log = tmp_path / "batches.jsonl"
    config = tmp_path / "service.toml"
    config.write_text(
        "[kafka]\nsession_timeout_ms = 6000\nheartbeat_interval_ms = 1000\n"
        "max_poll_interval_ms = 30000\n"
    )
    command = [
        sys.executable, "-m", "stream_trainer", "run", "--config", str(config),
        "--source", f"kafka://{kafka_bootstrap}/{features}",
        "--labels-source", f"kafka://{kafka_bootstrap}/{labels}",
        "--label-timeout-seconds", str(TIMEOUT_S), "--dead-letter", dead,
        "--predictions-topic", predictions,
        "--group", group, "--checkpoint", checkpoint_url, "--checkpoint-every-records", "200",
        "--batch-log", str(batch_log), "--metrics-address", "off", "--no-progress",
        "--max-batch-records", "64", "--max-wait-ms", "50", "--seed", str(seed),
        "--target", "label", "--task", "classification", "--hidden", "8",
    ]  # fmt: skip
    events, expect = _events(3000, seed)
    producer = Producer(kafka_bootstrap, {"features": features, "labels": labels})
    store = open_store(checkpoint_url)
    chunk = len(events) // (kills + 1)
    lost: list[int] = []
    try:
        for run in range(kills):
            part = events[run * chunk : (run + 1) * chunk]
            head, rest = part[:400], part[400:]
            before = store.latest_version() or 0
            producer.produce(head)
            log = tmp_path / f"run-{run}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command, cwd=ROOT, env=service_env(), stdout=out, stderr=out
                )
            try:
                wait_for(
                    lambda b=before: (store.latest_version() or 0) > b,
                    f"run {run} to checkpoint",
                    timeout_s=150.0,
                    detail=lambda log=log: log.read_text()[-3000:],
                )
                thread = producer.in_background(rest)
                time.sleep(rng.uniform(0.0, 0.8))
                deadline = time.monotonic() + 5.0
                while uncheckpointed_steps(store, batch_log) <= 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert process.poll() is None, log.read_text()[-3000:]
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                thread.join(timeout=60)
                lost.append(uncheckpointed_steps(store, batch_log))
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        producer.produce(events[kills * chunk :])
        report_path = tmp_path / "report.json"
        final = subprocess.run(
            [*command, "--stop-at-end", "--report-json", str(report_path)],
            cwd=ROOT,
            env=service_env(),
            capture_output=True,
            timeout=240,
        )
        assert final.returncode == 0, final.stderr.decode(errors="replace")[-3000:]
        checkpoint = store.load_latest()
    finally:
        store.close()
        producer.close()

    # The kills hit trainers with work no checkpoint covered yet.
    assert len(lost) == kills and any(n > 0 for n in lost), lost
    report = json.loads(report_path.read_text())
    labelled: set[int] = expect["labelled"]
    n = expect["n"]

    # Every label learned exactly once, by the persisted model, with the row it joined.
    learned = Counter(
        k
        for line in batch_log.read_text().splitlines()
        for k in json.loads(line).get("learned", [])
    )
    assert [k for k, c in learned.items() if c != 1] == []
    assert set(learned) == labelled
    assert report["samples"] == checkpoint.samples == len(labelled)
    # Every pending record either learned or counted expired (the sentinel "end" still waits).
    delayed = report["delayed_labels"]
    assert delayed["learned"] == len(labelled)
    assert delayed["expired"] == n - len(labelled)
    assert delayed["pending"] == 1 and checkpoint.state["service"]["labels"]["ids"] == ["end"]
    assert delayed["waiting_labels"] == 1  # the sentinel label
    # The hostile labels, each counted once across the kills (a bad label read after the good
    # one of its id is refused as a duplicate).
    unmatched = delayed["unmatched"]
    assert set(unmatched) == {"bad_label", "duplicate_id", "unknown_id"}
    assert unmatched["unknown_id"] == 5
    assert (
        unmatched["bad_label"] + unmatched["duplicate_id"] == expect["bad"] + expect["duplicated"]
    )
    assert expect["bad_first"] <= unmatched["bad_label"] <= expect["bad"]
    assert 0 < expect["bad_first"] < expect["bad"]  # both orders occur
    assert report["dead_lettered"] == {
        "bad_label": unmatched["bad_label"],
        "duplicate_id": unmatched["duplicate_id"],
    }
    # The served predictions, scored when the labels came, are those of a model that learns.
    assert report["accuracy"] > 0.85
    # Both topics' offsets are in the checkpoint and committed to Kafka.
    ends = {**end_offsets(kafka_bootstrap, features), **end_offsets(kafka_bootstrap, labels)}
    assert checkpoint.offsets == ends
    assert group_offsets(kafka_bootstrap, group) == ends
    assert math.isfinite(report["log_loss"])
    # Every record was predicted as it arrived, and its prediction carries its id (records
    # predicted again after a kill are published again: predictions are at least once).
    published = read_topic(
        kafka_bootstrap, predictions, sum(end_offsets(kafka_bootstrap, predictions).values())
    )
    ids = {json.loads(m.value)["id"] for m in published}
    assert ids == {*range(n), "end"}
