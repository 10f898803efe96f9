"""ServiceMetrics on a fresh CollectorRegistry: every method moves exactly the expected samples."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_trainer.errors import ConfigError
from stream_trainer.telemetry.metrics import DEAD_LETTER_REASONS, ServiceMetrics

LABELS = {"run": "r1", "model": "mlp", "norm": "batch_renorm"}


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample except the ``_created`` timestamps, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def changed(before: dict, after: dict) -> dict:
    return {k: v for k, v in after.items() if before.get(k) != v}


def key(name: str, **extra: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({**LABELS, **extra}.items()))


def make(task: str = "classification", **kwargs):
    registry = CollectorRegistry()
    clock = FakeClock()
    metrics = ServiceMetrics(registry, **LABELS, task=task, clock=clock, **kwargs)
    return registry, clock, metrics


def test_every_series_carries_run_model_norm():
    registry, _, metrics = make()
    metrics.observe_step(
        batch_size=3, trained=3, predicted_only=0, predict_seconds=0.1, learn_seconds=0.1, loss=1
    )
    metrics.set_prequential({"accuracy": 0.5, "rolling_accuracy": 0.5, "log_loss": 1, "kappa": 0})
    metrics.set_consumer_lag({"t:0": 1})
    metrics.checkpoint_saved(duration_seconds=0.1, size_bytes=10, version=1, step=2)
    metrics.set_norm_health("l0", drift=0.1, train_serve_gap=0.2)
    metrics.set_expert_weights({"mlp": 0.5, "linear": 0.5})
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            assert {k: sample.labels[k] for k in LABELS} == LABELS, sample
            names.add(sample.name)
    assert all(n.startswith("stream_trainer_") for n in names)


def test_fresh_registry_exports_zero_counters_and_the_known_dead_letter_reasons():
    registry, _, _ = make()
    values = samples(registry)
    assert values[key("stream_trainer_records_trained_total")] == 0
    assert values[key("stream_trainer_batches_total")] == 0
    assert values[key("stream_trainer_checkpoint_failures_total")] == 0
    for reason in DEAD_LETTER_REASONS:
        assert values[key("stream_trainer_records_dead_lettered_total", reason=reason)] == 0
    assert set(DEAD_LETTER_REASONS) == {
        "not_utf8", "not_json", "not_object", "wrong_type",
        "non_finite", "bad_label", "too_large", "no_features", "out_of_range", "too_deep",
        "too_many_new_features", "too_many_features", "too_many_classes", "bad_id",
        "duplicate_id",
    }  # fmt: skip
    # No fake values before the first report.
    for absent in (
        "stream_trainer_training_loss",
        "stream_trainer_prequential_accuracy",
        "stream_trainer_checkpoint_last_success_timestamp_seconds",
        "stream_trainer_checkpoint_size_bytes",
        "stream_trainer_model_version",
    ):
        assert not [k for k in values if k[0] == absent], absent
    info = values[key("stream_trainer_build_info", task="classification", version="0.1.0")]
    assert info == 1


def test_observe_step_moves_exactly_the_step_samples():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.observe_step(
        batch_size=5,
        trained=3,
        predicted_only=2,
        predict_seconds=0.002,
        learn_seconds=0.03,
        loss=0.7,
    )
    moved = changed(before, samples(registry))
    bucket = "stream_trainer_batch_size_records_bucket"
    step = "stream_trainer_step_duration_seconds"
    expected = {
        key("stream_trainer_records_trained_total"): 3,
        key("stream_trainer_records_predicted_only_total"): 2,
        key("stream_trainer_batches_total"): 1,
        key("stream_trainer_batch_size_records_count"): 1,
        key("stream_trainer_batch_size_records_sum"): 5,
        **{key(bucket, le=le): 1 for le in ("8.0", "16.0", "32.0", "64.0", "128.0")},
        **{key(bucket, le=le): 1 for le in ("256.0", "512.0", "1024.0", "+Inf")},
        key(f"{step}_count", phase="predict"): 1,
        key(f"{step}_sum", phase="predict"): 0.002,
        key(f"{step}_count", phase="learn"): 1,
        key(f"{step}_sum", phase="learn"): 0.03,
        key("stream_trainer_training_loss"): 0.7,
        # FakeClock did not move: elapsed 0 -> rate 0, unchanged.
    }
    predict_buckets = {k: v for k, v in moved.items() if k[0] == f"{step}_bucket"}
    assert predict_buckets == {
        **{key(f"{step}_bucket", phase="predict", le=le): 1 for le in _les_from(0.0025)},
        **{key(f"{step}_bucket", phase="learn", le=le): 1 for le in _les_from(0.05)},
    }
    assert {k: v for k, v in moved.items() if k[0] != f"{step}_bucket"} == pytest.approx(expected)


def _les_from(lowest: float) -> list[str]:
    from stream_trainer.telemetry.metrics import STEP_SECONDS_BUCKETS

    return [str(b) for b in STEP_SECONDS_BUCKETS if b >= lowest] + ["+Inf"]


def test_observe_step_without_loss_keeps_the_last_loss():
    registry, _, metrics = make()
    step = dict(batch_size=1, trained=1, predicted_only=0, predict_seconds=0, learn_seconds=0)
    metrics.observe_step(**step, loss=0.4)
    metrics.observe_step(**{**step, "trained": 0, "predicted_only": 1}, loss=None)
    assert registry.get_sample_value("stream_trainer_training_loss", LABELS) == 0.4


@pytest.mark.parametrize(
    ("trained", "predicted_only", "batch_size"), [(-1, 0, 1), (0, -1, 1), (2, 2, 3)]
)
def test_observe_step_rejects_inconsistent_counts(trained, predicted_only, batch_size):
    registry, _, metrics = make()
    before = samples(registry)
    with pytest.raises(ValueError, match="trained"):
        metrics.observe_step(
            batch_size=batch_size,
            trained=trained,
            predicted_only=predicted_only,
            predict_seconds=0,
            learn_seconds=0,
            loss=None,
        )
    assert samples(registry) == before


def test_samples_per_second_is_a_sliding_window_computed_at_scrape():
    registry, clock, metrics = make(rate_window_seconds=10)
    name = "stream_trainer_samples_per_second"
    step = dict(trained=0, predict_seconds=0, learn_seconds=0, loss=None)
    clock.now += 2
    metrics.observe_step(batch_size=40, predicted_only=40, **step)
    assert registry.get_sample_value(name, LABELS) == 20  # 40 records in the 2 s since start
    clock.now += 8
    metrics.observe_step(batch_size=60, predicted_only=60, **step)
    assert registry.get_sample_value(name, LABELS) == 10  # 100 records / 10 s window
    clock.now += 5  # the first batch left the window
    assert registry.get_sample_value(name, LABELS) == 6
    clock.now += 100  # the stream stopped: the rate falls to 0 instead of freezing
    assert registry.get_sample_value(name, LABELS) == 0


def test_set_prequential_classification():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.set_prequential(
        {"accuracy": 0.9, "rolling_accuracy": 0.8, "log_loss": 0.3, "kappa": 0.6}
    )
    assert changed(before, samples(registry)) == {
        key("stream_trainer_prequential_accuracy", window="cumulative"): 0.9,
        key("stream_trainer_prequential_accuracy", window="rolling"): 0.8,
        key("stream_trainer_prequential_log_loss"): 0.3,
        key("stream_trainer_prequential_kappa"): 0.6,
    }
    with pytest.raises(ValueError, match="mae"):
        metrics.set_prequential({"mae": 1.0})


def test_set_prequential_regression_has_only_regression_gauges():
    registry, _, metrics = make("regression")
    before = samples(registry)
    metrics.set_prequential({"mae": 1.5, "rmse": 2.0, "r2": 0.25})
    assert changed(before, samples(registry)) == {
        key("stream_trainer_prequential_mae"): 1.5,
        key("stream_trainer_prequential_rmse"): 2.0,
        key("stream_trainer_prequential_r2"): 0.25,
    }
    families = {f.name for f in registry.collect()}
    assert "stream_trainer_prequential_accuracy" not in families
    with pytest.raises(ValueError, match="accuracy"):
        metrics.set_prequential({"accuracy": 1.0})


def test_dead_lettered_counts_by_reason_and_rejects_unknown_reasons():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.dead_lettered("not_json")
    metrics.dead_lettered("too_large", 3)
    assert changed(before, samples(registry)) == {
        key("stream_trainer_records_dead_lettered_total", reason="not_json"): 1,
        key("stream_trainer_records_dead_lettered_total", reason="too_large"): 3,
    }
    with pytest.raises(ValueError, match="unknown dead-letter reason 'oops'"):
        metrics.dead_lettered("oops")


def test_consumer_lag_follows_the_assignment():
    registry, _, metrics = make()
    name = "stream_trainer_consumer_lag_records"
    metrics.set_consumer_lag({"phishing:0": 5, "phishing:1": 7, "a:b:2": 1})
    lag = {k: v for k, v in samples(registry).items() if k[0] == name}
    assert lag == {
        key(name, topic="phishing", partition="0"): 5,
        key(name, topic="phishing", partition="1"): 7,
        key(name, topic="a:b", partition="2"): 1,
    }
    metrics.set_consumer_lag({"phishing:1": 0})  # partitions 0 and a:b:2 revoked
    lag = {k: v for k, v in samples(registry).items() if k[0] == name}
    assert lag == {key(name, topic="phishing", partition="1"): 0}
    for bad in ("phishing", "phishing:x", ":0"):
        with pytest.raises(ValueError, match="topic:partition"):
            metrics.set_consumer_lag({bad: 1})


def test_checkpoint_saved_and_age_at_scrape_time():
    registry, clock, metrics = make()
    age = "stream_trainer_checkpoint_age_seconds"
    clock.now += 30
    assert registry.get_sample_value(age, LABELS) == 30  # no checkpoint yet: age since start
    before = samples(registry)
    metrics.checkpoint_saved(duration_seconds=0.2, size_bytes=4096, version=3, step=1200)
    moved = changed(before, samples(registry))
    hist = "stream_trainer_checkpoint_duration_seconds"
    buckets = {k for k in moved if k[0] == f"{hist}_bucket"}
    assert {dict(k[1])["le"] for k in buckets} == {
        "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "+Inf"
    }  # fmt: skip
    assert {k: v for k, v in moved.items() if k not in buckets} == pytest.approx(
        {
            key(f"{hist}_count"): 1,
            key(f"{hist}_sum"): 0.2,
            key("stream_trainer_checkpoint_size_bytes"): 4096,
            key("stream_trainer_checkpoint_last_success_timestamp_seconds"): 1030,
            key("stream_trainer_checkpoint_age_seconds"): 0,
            key("stream_trainer_model_version", kind="checkpoint"): 3,
            key("stream_trainer_model_version", kind="step"): 1200,
        }
    )
    clock.now += 7
    assert registry.get_sample_value(age, LABELS) == 7


def test_checkpoint_failed_counts_only_failures():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.checkpoint_failed()
    assert changed(before, samples(registry)) == {
        key("stream_trainer_checkpoint_failures_total"): 1
    }


def test_norm_health_per_layer():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.set_norm_health("layers.0.norm", drift=0.05, train_serve_gap=0.01)
    metrics.set_norm_health("layers.1.norm", drift=0.5, train_serve_gap=math.inf)
    assert changed(before, samples(registry)) == {
        key("stream_trainer_norm_running_stats_drift", layer="layers.0.norm"): 0.05,
        key("stream_trainer_norm_train_serve_gap", layer="layers.0.norm"): 0.01,
        key("stream_trainer_norm_running_stats_drift", layer="layers.1.norm"): 0.5,
        key("stream_trainer_norm_train_serve_gap", layer="layers.1.norm"): math.inf,
    }


def test_expert_weights_per_expert():
    registry, _, metrics = make()
    before = samples(registry)
    metrics.set_expert_weights({"mlp": 0.25, "linear": 0.75})
    assert changed(before, samples(registry)) == {
        key("stream_trainer_expert_weight", expert="mlp"): 0.25,
        key("stream_trainer_expert_weight", expert="linear"): 0.75,
    }
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        metrics.set_expert_weights({"mlp": 1.5})


def test_set_info_adds_labels_and_refuses_contradicting_the_series_labels():
    registry, _, metrics = make()
    metrics.set_info(hidden="64,64", norm="batch_renorm", torch="2.5")
    info = [k for k in samples(registry) if k[0] == "stream_trainer_build_info"]
    assert info == [
        key(
            "stream_trainer_build_info",
            hidden="64,64",
            task="classification",
            torch="2.5",
            version="0.1.0",
        )
    ]
    with pytest.raises(ValueError, match="contradicts"):
        metrics.set_info(norm="layer_norm")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "ranking"},
        {"run": ""},
        {"rate_window_seconds": 0},
    ],
)
def test_constructor_rejects_bad_configuration(kwargs):
    args = {**LABELS, "task": "classification", **kwargs}
    with pytest.raises(ConfigError):
        ServiceMetrics(CollectorRegistry(), **args)


def test_default_registry_is_fresh_and_exposition_parses():
    a = ServiceMetrics(run="a", model="m", norm="n", task="classification")
    b = ServiceMetrics(run="b", model="m", norm="n", task="classification")
    assert a.registry is not b.registry
    text = generate_latest(a.registry).decode()
    assert 'stream_trainer_records_trained_total{model="m",norm="n",run="a"} 0.0' in text
