"""A real Prometheus scrapes MetricsServers fed like a live service; every dashboard query returns
data, and what Prometheus stored agrees with what was fed."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream_trainer.service.serving import LiveModelEndpoint, ModelLock
from stream_trainer.telemetry.http import HealthState, MetricsServer
from stream_trainer.telemetry.metrics import ServiceMetrics, register_loop_age
from stream_trainer.training import IncrementalTrainer, TrainerConfig
from tests.fixtures.prometheus import PrometheusProcess, dashboard_queries

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards/grafana/stream-trainer.json"
LAYERS = ("layers.0.norm", "layers.1.norm")


class Feed:
    """Drive a ServiceMetrics like the service loop would, and remember the totals."""

    def __init__(self, metrics: ServiceMetrics, seed: int) -> None:
        self.metrics = metrics
        self.rng = random.Random(seed)
        self.trained = 0
        self.predicted_only = 0
        self.batches = 0
        self.dead = 0
        self.checkpoints = 0
        self.step = 0

    def batches_then_checkpoint(self, n_batches: int) -> None:
        m, rng = self.metrics, self.rng
        for _ in range(n_batches):
            size = rng.choice((1, 1, 2, 3, 8, 17, 64, 200))
            unlabeled = rng.randint(0, size // 4)
            m.observe_step(
                batch_size=size,
                trained=size - unlabeled,
                predicted_only=unlabeled,
                predict_seconds=rng.uniform(0.0002, 0.004),
                learn_seconds=rng.uniform(0.001, 0.03),
                loss=rng.uniform(0.2, 0.9) if size > unlabeled else None,
            )
            self.trained += size - unlabeled
            self.predicted_only += unlabeled
            self.batches += 1
            self.step += size - unlabeled
        if m.task == "classification":
            m.set_prequential(
                {
                    "accuracy": rng.uniform(0.7, 0.9),
                    "rolling_accuracy": rng.uniform(0.6, 1.0),
                    "log_loss": rng.uniform(0.3, 0.6),
                    "kappa": rng.uniform(0.4, 0.8),
                }
            )
        else:
            m.set_prequential({"mae": rng.uniform(1, 2), "rmse": rng.uniform(2, 3), "r2": 0.5})
        m.dead_lettered("not_json", 2)
        m.dead_lettered("non_finite")
        self.dead += 3
        m.set_consumer_lag({f"phishing:{p}": rng.randint(0, 50) for p in range(3)})
        for layer in LAYERS:
            m.set_norm_health(layer, drift=rng.uniform(0, 0.1), train_serve_gap=rng.uniform(0, 1))
        linear = rng.uniform(0, 1)
        m.set_expert_weights({"mlp": 1 - linear, "linear": linear})
        m.set_expert_losses({"mlp": rng.uniform(0, 50), "linear": rng.uniform(0, 50)})
        m.observe_labels(
            pending=rng.randint(0, 500),
            delays=[rng.uniform(0.5, 600.0) for _ in range(20)],
            expired=rng.randint(1, 5),
            unmatched={"unknown_id": rng.randint(1, 3), "duplicate_id": 1},
        )
        self.checkpoints += 1
        m.checkpoint_saved(
            duration_seconds=rng.uniform(0.005, 0.2),
            size_bytes=rng.randint(40_000, 60_000),
            version=self.checkpoints,
            step=self.step,
        )


@pytest.fixture(scope="module")
def scraped(prometheus_server) -> Iterator[tuple[PrometheusProcess, dict[str, Feed]]]:
    """Two services (a classification and a regression run) behind two MetricsServers, scraped
    every second; two rounds of batches, each followed by a fresh scrape, so rate() has data."""
    feeds: dict[str, Feed] = {}
    servers: list[MetricsServer] = []
    ready = HealthState(consuming=True, checkpointing=True)
    for seed, (run, norm, task) in enumerate(
        [("clf-1", "batch_renorm", "classification"), ("reg-1", "layer_norm", "regression")]
    ):
        metrics = ServiceMetrics(run=run, model="mlp", norm=norm, task=task)
        metrics.set_info(hidden="64,64")
        feeds[run] = Feed(metrics, seed)
        # what the service registers beside ServiceMetrics: the loop age and POST /predict
        register_loop_age(metrics.registry, run=run, age=lambda: 0.25)
        endpoint = LiveModelEndpoint(
            IncrementalTrainer(TrainerConfig(target="y")), ModelLock(), settings={},
            checkpoint_version=lambda: None, registry=metrics.registry, run=run,
        )  # fmt: skip
        endpoint.predict({"x": 1.0})
        endpoint.predict("not an object")
        servers.append(MetricsServer("127.0.0.1:0", metrics.registry, health=lambda: ready).start())
    try:
        prometheus = prometheus_server([f"127.0.0.1:{s.port}" for s in servers])
        prometheus.wait_for_scrape()
        for _ in range(2):
            for feed in feeds.values():
                feed.batches_then_checkpoint(40)
            feeds["clf-1"].metrics.checkpoint_failed()
            prometheus.wait_for_scrape()
        yield prometheus, feeds
    finally:
        for server in servers:
            server.close()


def _finite_values(samples: list[dict]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in samples) if math.isfinite(v)]


def test_every_dashboard_query_returns_data(scraped):
    prometheus, _ = scraped
    queries = dashboard_queries(DASHBOARD, include_template_queries=True)
    assert len(queries) > 20
    empty = [q for q in queries if not prometheus.query(q)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    # Also numbers, not only NaN (a histogram_quantile over buckets that did not move is NaN).
    nan_only = [q for q in queries if not _finite_values(prometheus.query(q))]
    assert not nan_only, "dashboard queries with only NaN:\n" + "\n".join(nan_only)


def test_queries_for_one_run_see_only_that_run(scraped):
    prometheus, _ = scraped
    for expr in dashboard_queries(DASHBOARD, {"run": "clf-1", "norm": "batch_renorm"}):
        for sample in prometheus.query(expr):
            assert sample["metric"].get("run", "clf-1") == "clf-1", (expr, sample)


def test_scraped_values_agree_with_what_was_fed(scraped):
    prometheus, feeds = scraped
    for run, feed in feeds.items():
        sel = f'{{run="{run}"}}'
        assert prometheus.value(f"stream_trainer_records_trained_total{sel}") == feed.trained
        assert (
            prometheus.value(f"stream_trainer_records_predicted_only_total{sel}")
            == feed.predicted_only
        )
        assert prometheus.value(f"stream_trainer_batches_total{sel}") == feed.batches
        assert prometheus.value(f"stream_trainer_batch_size_records_count{sel}") == feed.batches
        assert (
            prometheus.value(f"sum(stream_trainer_records_dead_lettered_total{sel})") == feed.dead
        )
        assert (
            prometheus.value(f'stream_trainer_model_version{{run="{run}", kind="checkpoint"}}')
            == feed.checkpoints
        )
        assert (
            prometheus.value(f'stream_trainer_model_version{{run="{run}", kind="step"}}')
            == feed.step
        )
        assert prometheus.value(f"count(stream_trainer_consumer_lag_records{sel})") == 3
        assert prometheus.value(f"count(stream_trainer_norm_train_serve_gap{sel})") == len(LAYERS)
        age = prometheus.value(f"stream_trainer_checkpoint_age_seconds{sel}")
        assert 0 <= age < 30
    assert prometheus.value('stream_trainer_checkpoint_failures_total{run="clf-1"}') == 2
    build = prometheus.query('stream_trainer_build_info{run="reg-1"}')
    assert build[0]["metric"]["task"] == "regression"
    assert build[0]["metric"]["hidden"] == "64,64"
