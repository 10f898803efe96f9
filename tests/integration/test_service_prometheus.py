"""The real service, scraped by a real Prometheus: every dashboard query returns data, and what
Prometheus stored agrees with what the service counted and with what was produced.

Two services run in threads of this process, each with its metrics on a free port: a
classification run learning river's Phishing (plus malformed records) from a 3-partition topic, and
a regression run learning river's TrumpApproval (the dashboard has panels for both tasks). The
malformed records are produced *first*, and Phishing's records only once the service has consumed
and checkpointed them: those dead letters arrive before the task is known, when the service has no
metrics yet, and must still be counted. The services run without ``stop_at_end`` until Prometheus
has scraped their final counts, then are stopped with their own stop request; a restarted service
reports the restored model's version before it trains anything.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumers.producer import Pacer, TopicProducer, replay_records
from stream_trainer.records import Record
from stream_trainer.service import ServiceConfig, TrainerService
from stream_trainer.sources import open_source
from stream_trainer.training import TrainerConfig
from tests.fixtures.kafka import produce_messages
from tests.fixtures.prometheus import PrometheusProcess, dashboard_queries

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards/grafana/stream-trainer.json"
HIDDEN = (16, 16)
# Malformed values and the reason each is dead-lettered for.
MALFORMED: list[tuple[bytes | None, str]] = [
    (b"{not json", "not_json"),
    (None, "not_json"),  # a tombstone
    (b"[1, 2, 3]", "not_object"),
    (b"\xff\xfe{}", "not_utf8"),
    (b'{"is_phishing": true, "empty_server_form_handler": NaN}', "non_finite"),
    (b'{"is_phishing": false, "url_length": {"nested": 1}}', "wrong_type"),
]
REGRESSION_RECORDS = 300


@dataclass
class RunningService:
    """One TrainerService running in a thread, and what was produced for it."""

    service: TrainerService
    topic: str
    valid: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    report: dict[str, Any] | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        def target() -> None:
            try:
                self.report = self.service.run()
            except BaseException as exc:  # reported by stop()
                self.error = exc

        self.thread = threading.Thread(target=target, name=f"service-{self.topic}", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        self.service.request_stop()
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.topic}: the service did not stop in {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report

    @property
    def run(self) -> str:
        return self.service.config.run_name


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _config(bootstrap: str, topic: str, run: str, checkpoint: str, target: str) -> ServiceConfig:
    return ServiceConfig(
        source=f"kafka://{bootstrap}/{topic}",
        group=f"g-{topic}",
        run_name=run,
        checkpoint=checkpoint,
        checkpoint_every_records=200,
        checkpoint_every_seconds=1.0,
        metrics_address="127.0.0.1:0",
        max_batch_records=32,
        max_wait_ms=50,
        health_every_steps=5,
        shutdown_timeout_seconds=20.0,
        progress=False,
        serve_predictions=True,
        trainer=TrainerConfig(target=target, hidden=HIDDEN),
    )


def _produce(bootstrap: str, topic: str, spec: str, rate: float, limit: int | None = None) -> int:
    """Replay ``spec`` into ``topic`` at ``rate`` records/s, round-robin over its partitions, while
    the service reads it (a live stream spread over several scrapes, so that rate() has data);
    returns the records sent."""
    records = (r for r in open_source(spec) if isinstance(r, Record))
    with TopicProducer(bootstrap, topic) as producer:
        report = replay_records(itertools.islice(records, limit), producer, Pacer(rate=rate))
    return report.sent


def _post_predict(url: str) -> None:
    request = urllib.request.Request(
        f"{url}/predict", data=b'{"x": 1.0}', headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:  # 503 before the first model: counted all the same
        assert exc.code == 503, exc


def _value(prometheus: PrometheusProcess, expr: str) -> float | None:
    samples = prometheus.query(expr)
    return float(samples[0]["value"][1]) if len(samples) == 1 else None


@pytest.fixture(scope="module")
def scraped(
    kafka_bootstrap: str, redis_server: Any, prometheus_server: Any
) -> Iterator[tuple[PrometheusProcess, dict[str, RunningService], float]]:
    """Both services trained on their whole topics and scraped; yields (prometheus, runs, t) with
    ``t`` the Unix time at which Prometheus first held every final value."""
    from tests.fixtures.kafka import create_topic

    suffix = f"{time.time_ns() % 10**9}"
    with redis_server.client() as client:
        client.flushdb()
    clf_topic = create_topic(kafka_bootstrap, f"svc-prom-phishing-{suffix}", partitions=3)
    reg_topic = create_topic(kafka_bootstrap, f"svc-prom-trump-{suffix}", partitions=3)
    clf = RunningService(
        TrainerService(
            _config(
                kafka_bootstrap,
                clf_topic,
                "phishing-ema",
                f"{redis_server.url}?prefix=clf-{suffix}",
                "is_phishing",
            ),
            registry=CollectorRegistry(),
        ),
        clf_topic,
    )
    reg = RunningService(
        TrainerService(
            _config(
                kafka_bootstrap,
                reg_topic,
                "trump-ema",
                f"{redis_server.url}?prefix=reg-{suffix}",
                "approval",
            ),
            registry=CollectorRegistry(),
        ),
        reg_topic,
    )
    runs = {clf.run: clf, reg.run: reg}
    # Malformed records only, spread over the 3 partitions: the service has no task (no metrics)
    # while it dead-letters them.
    produce_messages(
        kafka_bootstrap, clf_topic, [(i % 3, b"k", value) for i, (value, _) in enumerate(MALFORMED)]
    )
    clf.malformed.update(reason for _, reason in MALFORMED)
    try:
        for run in runs.values():
            run.start()
        _wait(lambda: all(r.service.server is not None for r in runs.values()), "metrics servers")
        for run in runs.values():  # the dashboard's request panel: one answered request each
            _post_predict(run.service.server.url)  # type: ignore[union-attr]
        prometheus = prometheus_server(
            [f"127.0.0.1:{r.service.server.port}" for r in runs.values()]  # type: ignore[union-attr]
        )
        # Every malformed record consumed and checkpointed before a single valid one exists.
        _wait(
            lambda: sum(clf.service.saved_offsets.values()) == len(MALFORMED),
            "the malformed records to be checkpointed",
        )
        assert clf.service.metrics is None, "no task is known yet: there should be no metrics"
        # The histograms appear with the first valid record; produced slowly enough that training
        # spans several scrapes (else every rate() of a histogram is 0 and its quantiles NaN).
        clf.valid = _produce(kafka_bootstrap, clf_topic, "river:Phishing", rate=150)
        reg.valid = _produce(
            kafka_bootstrap, reg_topic, "river:TrumpApproval", rate=40, limit=REGRESSION_RECORDS
        )

        unmet: list[str] = []

        def final(run: RunningService) -> bool:
            sel = f'run="{run.run}"'
            steps = run.service.trainer.steps
            checks = {
                f"{run.run} trained": (
                    _value(prometheus, f"stream_trainer_records_trained_total{{{sel}}}"),
                    run.valid,
                ),
                f"{run.run} dead letters": (
                    _value(prometheus, f"sum(stream_trainer_records_dead_lettered_total{{{sel}}})"),
                    sum(run.malformed.values()),
                ),
                f"{run.run} model step": (
                    _value(prometheus, f'stream_trainer_model_version{{{sel}, kind="step"}}'),
                    steps,
                ),
                f"{run.run} lag series": (
                    _value(prometheus, f"count(stream_trainer_consumer_lag_records{{{sel}}})"),
                    3,
                ),
                f"{run.run} lag": (
                    _value(prometheus, f"sum(stream_trainer_consumer_lag_records{{{sel}}})"),
                    0,
                ),
            }
            unmet[:] = [f"{k}: {got} != {want}" for k, (got, want) in checks.items() if got != want]
            return not unmet

        # Generous: on a loaded 2-core machine the services can lag well behind the producer.
        try:
            _wait(
                lambda: all(final(r) for r in runs.values()),
                "Prometheus to scrape the final counts",
                timeout=180.0,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still unmet: {unmet}") from None
        final_time = time.time()
        yield prometheus, runs, final_time
    finally:
        for run in runs.values():
            if run.thread is not None and run.thread.is_alive():
                run.stop()


def _finite(samples: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in samples) if math.isfinite(v)]


def test_every_dashboard_query_returns_data(scraped):
    prometheus, _, final_time = scraped
    # The final counts are confirmed only after the lag (read every 5 s) reaches 0 and Prometheus
    # scraped it, which can be well after the last training step on a loaded machine: a rate
    # window of 2 minutes keeps the whole training inside every rate() of the dashboard.
    queries = dashboard_queries(
        DASHBOARD, include_template_queries=True, intervals={"__rate_interval": "2m"}
    )
    assert len(queries) > 20
    # Evaluated at the moment the final counts were in, so that rate() windows hold the training.
    results = {q: prometheus.api("query", query=q, time=f"{final_time:.3f}") for q in queries}
    empty = [q for q, data in results.items() if not data["result"]]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # These services take their labels inline: the label-delay histogram of the delayed-label row
    # has no observation, so its quantiles are NaN by design (tests/integration/
    # test_prometheus_dashboard.py feeds that row and checks it).
    nan_only = [
        q
        for q, data in results.items()
        if data["resultType"] == "vector"
        and not _finite(data["result"])
        and "label_delay_seconds" not in q
    ]
    assert not nan_only, "dashboard queries with only NaN:\n" + "\n".join(nan_only)


def test_per_layer_and_per_partition_series_exist(scraped):
    prometheus, runs, _ = scraped
    for run in runs.values():
        sel = f'{{run="{run.run}"}}'
        layers = {
            s["metric"]["layer"]
            for s in prometheus.query(f"stream_trainer_norm_train_serve_gap{sel}")
        }
        drift = {
            s["metric"]["layer"]
            for s in prometheus.query(f"stream_trainer_norm_running_stats_drift{sel}")
        }
        # each member's norm layers, named mlp<k>/<layer>
        assert layers == set(run.service.trainer.norm_snapshot()), layers
        assert len(layers) == len(HIDDEN) * len(run.service.trainer.members), layers
        assert drift == layers
        partitions = {
            s["metric"]["partition"]
            for s in prometheus.query(f"stream_trainer_consumer_lag_records{sel}")
        }
        assert partitions == {"0", "1", "2"}
        weights = {
            s["metric"]["expert"]: float(s["value"][1])
            for s in prometheus.query(f"stream_trainer_expert_weight{sel}")
        }
        assert set(weights) == {"mlp0", "mlp1", "mlp2", "linear"}, weights  # the default members
        assert math.isclose(sum(weights.values()), 1.0, rel_tol=1e-9), weights
        losses = {
            s["metric"]["expert"]
            for s in prometheus.query(f"stream_trainer_expert_recent_loss{sel}")
        }
        assert losses == set(weights)
        assert prometheus.value(f"stream_trainer_checkpoint_size_bytes{sel}") > 0
        assert 0 <= prometheus.value(f"stream_trainer_checkpoint_age_seconds{sel}") < 60
        assert prometheus.value(f"stream_trainer_checkpoint_duration_seconds_count{sel}") >= 1


def test_scraped_values_agree_with_the_service_and_the_stream(scraped):
    prometheus, runs, _ = scraped
    for run in runs.values():
        service = run.service
        sel = f'run="{run.run}"'
        trained = prometheus.value(f"stream_trainer_records_trained_total{{{sel}}}")
        assert trained == run.valid == service.trainer.samples_trained
        dead = {
            s["metric"]["reason"]: float(s["value"][1])
            for s in prometheus.query(f"stream_trainer_records_dead_lettered_total{{{sel}}}")
        }
        assert {k: v for k, v in dead.items() if v} == dict(run.malformed)
        assert Counter(service.dead_lettered) == run.malformed
        assert prometheus.value(f"stream_trainer_batches_total{{{sel}}}") == service.trainer.steps
        assert (
            prometheus.value(f'stream_trainer_model_version{{{sel}, kind="checkpoint"}}')
            == service.checkpoint_version
        )
        assert prometheus.value(f"stream_trainer_checkpoint_failures_total{{{sel}}}") == 0
        metrics = service.trainer.metrics()
        if service.trainer.task == "classification":
            accuracy = prometheus.value(
                f'stream_trainer_prequential_accuracy{{{sel}, window="cumulative"}}'
            )
            assert accuracy == pytest.approx(metrics["accuracy"])
        else:
            assert prometheus.value(f"stream_trainer_prequential_mae{{{sel}}}") == pytest.approx(
                metrics["mae"]
            )


def test_stop_request_then_restart_reports_the_restored_model(scraped):
    _, runs, _ = scraped
    clf = runs["phishing-ema"]
    report = clf.stop()
    assert report["final_checkpoint_ok"]
    assert report["records_trained"] == clf.valid
    assert report["rejected"] == dict(sorted(clf.malformed.items()))
    total = clf.valid + sum(clf.malformed.values())
    assert sum(report["next_offsets"].values()) == total
    # A restarted service (nothing new to read) exports the restored model's version at once.
    registry = CollectorRegistry()
    restarted = RunningService(TrainerService(clf.service.config, registry=registry), clf.topic)
    assert restarted.service.trainer.samples_trained == clf.valid
    restarted.start()
    try:
        labels = {"run": clf.run, "model": "mlp", "norm": "ema_batch"}
        _wait(
            lambda: (
                registry.get_sample_value(
                    "stream_trainer_model_version", {**labels, "kind": "checkpoint"}
                )
                is not None
            ),
            "the restored model version",
            timeout=20,
        )
        assert (
            registry.get_sample_value(
                "stream_trainer_model_version", {**labels, "kind": "checkpoint"}
            )
            == report["checkpoint_version"]
        )
        assert (
            registry.get_sample_value("stream_trainer_model_version", {**labels, "kind": "step"})
            == report["steps"]
        )
    finally:
        again = restarted.stop()
    assert again["records_trained"] == 0
    assert again["checkpoint_version"] == report["checkpoint_version"]
