"""MetricsServer over real HTTP on a loopback port chosen by the OS."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from stream_trainer.errors import ConfigError
from stream_trainer.telemetry.http import (
    DEFAULT_METRICS_ADDRESS,
    HealthState,
    MetricsServer,
    parse_metrics_address,
)
from stream_trainer.telemetry.metrics import ServiceMetrics

READY = HealthState(consuming=True, checkpointing=True)


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def served():
    metrics = ServiceMetrics(run="r1", model="mlp", norm="layer_norm", task="classification")
    state = {"health": READY}
    server = MetricsServer("127.0.0.1:0", metrics.registry, health=lambda: state["health"])
    with server:
        yield server, metrics, state


def test_metrics_endpoint_serves_the_registry_in_text_format(served):
    server, metrics, _ = served
    metrics.observe_step(
        batch_size=4, trained=4, predicted_only=0, predict_seconds=0.0, learn_seconds=0, loss=0.5
    )
    status, content_type, body = get(f"{server.url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    values = {
        (s.name, s.labels.get("run")): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert values[("stream_trainer_records_trained_total", "r1")] == 4
    assert values[("stream_trainer_training_loss", "r1")] == 0.5


def test_metrics_endpoint_speaks_openmetrics_when_asked(served):
    server, _, _ = served
    status, content_type, body = get(
        f"{server.url}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_healthz_is_200_even_when_not_ready(served):
    server, _, state = served
    state["health"] = HealthState(consuming=False, checkpointing=False, reasons=("x",))
    assert get(f"{server.url}/healthz")[0] == 200


def test_readyz_follows_health_and_says_why(served):
    server, _, state = served
    status, content_type, body = get(f"{server.url}/readyz")
    assert (status, json.loads(body)["ready"]) == (200, True)
    assert content_type.startswith("application/json")

    state["health"] = HealthState(
        consuming=True, checkpointing=False, reasons=("last 3 checkpoints failed",)
    )
    status, _, body = get(f"{server.url}/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "consuming": True,
        "checkpointing": False,
        "reasons": ["last 3 checkpoints failed"],
    }


def test_readyz_is_503_when_the_health_callback_raises():
    def broken() -> HealthState:
        raise RuntimeError("boom")

    with MetricsServer("127.0.0.1:0", CollectorRegistry(), health=broken) as server:
        status, _, body = get(f"{server.url}/readyz")
    assert status == 503
    assert "boom" in json.loads(body)["reasons"][0]


def test_unknown_path_is_404(served):
    assert get(f"{served[0].url}/nope")[0] == 404


def test_port_zero_binds_a_free_port_and_close_is_idempotent():
    server = MetricsServer("127.0.0.1:0", CollectorRegistry(), health=lambda: READY)
    server.start()
    port = server.port
    assert port > 0
    assert get(f"{server.url}/healthz")[0] == 200
    server.close()
    server.close()
    with socket.socket() as sock:  # the port was released
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    with pytest.raises(RuntimeError, match="closed"):
        server.start()


def test_close_without_start_returns():
    MetricsServer("127.0.0.1:0", CollectorRegistry(), health=lambda: READY).close()


def test_a_taken_port_is_a_config_error():
    with MetricsServer("127.0.0.1:0", CollectorRegistry(), health=lambda: READY) as first:
        second = MetricsServer(f"127.0.0.1:{first.port}", CollectorRegistry(), health=lambda: READY)
        with pytest.raises(ConfigError, match="cannot listen"):
            second.start()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEFAULT_METRICS_ADDRESS, ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9100", ("::1", 9100)),
    ],
)
def test_parse_metrics_address(text, expected):
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["9100", ":9100", "host:", "host:port", "h:70000", "::1:9100"])
def test_parse_metrics_address_rejects_with_the_value(text):
    with pytest.raises(ConfigError, match="--metrics-address") as info:
        parse_metrics_address(text)
    assert repr(text) in str(info.value) or text in str(info.value)
