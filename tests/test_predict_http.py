"""``POST /predict``, ``GET /model`` and ``/healthz`` over real HTTP on loopback, against a
running service that learns from a file: answers equal the trainer's own predictions, hostile
requests get 4xx with a reason and never reach the model, a stuck step turns ``/healthz`` 503
within its bound, and requests during training lose no record."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_trainer.records import Record
from stream_trainer.service import TrainerService, load_service_config
from tests.service_doubles import PausingService

LIVENESS_BOUND = 1.0


def _csv(path: Path, rows: int, *, regression: bool = False) -> Path:
    lines = ["x1,x2,colour,label"]
    colours = ("red", "green", "blue")
    for i in range(rows):
        x1, x2 = i % 9, math.cos(i)
        label = f"{x1 * 0.5 + x2:.4f}" if regression else str(int(x1 > 4))
        lines.append(f"{x1},{x2:.6f},{colours[i % 3]},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, source: Path, task: str, **flags: Any) -> Any:
    settings: dict[str, Any] = {
        "source": str(source),
        "checkpoint": f"file://{tmp_path / 'checkpoints'}",
        "checkpoint_every_records": 200,
        "batch_sizes": "1:64",
        "dead_letter": str(tmp_path / "dead-letters.jsonl"),
        "metrics_address": "127.0.0.1:0",
        "serve_predictions": True,
        "liveness_timeout_seconds": LIVENESS_BOUND,
        "progress": False,
        **flags,
    }
    trainer = {"target": "label", "task": task, "hidden": (8,), "seed": 3}
    return load_service_config(flags=settings, trainer_flags=trainer, environ={})


class Running:
    """A service running in a thread; ``report`` once it returned."""

    def __init__(self, service: TrainerService) -> None:
        self.service = service
        self.report: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.report = self.service.run()
        except BaseException as exc:
            self.error = exc

    @property
    def url(self) -> str:
        deadline = time.monotonic() + 30
        while self.service.server is None:
            assert time.monotonic() < deadline, "the HTTP server did not start"
            time.sleep(0.01)
        return self.service.server.url

    def stop(self) -> dict[str, Any]:
        self.service.stop_event.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request on its own connection, the headers exactly as given (no Content-Length
    added); the body parsed as JSON when the answer says it is JSON."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        data = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data.decode()
    finally:
        conn.close()


def post(url: str, payload: Any) -> tuple[int, Any]:
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return request(url, "POST", "/predict", body, headers)


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A classification service paused after 20 batches (about 600 records learned)."""
    tmp_path = tmp_path_factory.mktemp("paused")
    config = _config(tmp_path, _csv(tmp_path / "data.csv", 3000), "classification")
    running = Running(PausingService(config, pause_after=20))
    assert running.service.paused.wait(timeout=60), running.error
    yield running
    running.service.resume.set()
    running.stop()


QUERIES = [
    {"x1": 1.0, "x2": 0.5, "colour": "red"},
    {"x1": 8, "x2": -0.2, "colour": "blue"},
    {"x1": 6, "x2": 0.1},  # a missing feature is the mean
    {"x1": 2, "x2": 0.3, "colour": "violet", "new": 5},  # unseen category, unseen feature
]


def test_predictions_are_the_trainers_own(paused: Running) -> None:
    trainer = paused.service.trainer
    status, body = post(paused.url, QUERIES)
    assert status == 200, body
    expected = trainer.predict_proba_many([Record(dict(q)) for q in QUERIES])
    assert body["probabilities"] == expected
    assert body["predictions"] == trainer.predict_many([Record(dict(q)) for q in QUERIES])
    assert set(body["predictions"]) <= {"0", "1"}
    for proba in body["probabilities"]:
        assert sum(proba.values()) == pytest.approx(1.0)
    assert body["model"] == {
        "checkpoint_version": paused.service.checkpoint_version,
        "samples_seen": trainer.samples_trained,
        "step": trainer.steps,
    }
    assert body["model"]["samples_seen"] > 0
    assert body["model"]["checkpoint_version"] is not None  # one every 200 records


def test_one_object_is_a_list_of_one(paused: Running) -> None:
    status, body = post(paused.url, QUERIES[0])
    status_list, body_list = post(paused.url, [QUERIES[0]])
    assert (status, status_list) == (200, 200)
    assert body == body_list
    assert len(body["predictions"]) == 1


def test_a_label_sent_along_is_ignored_and_nothing_is_learned(paused: Running) -> None:
    trainer = paused.service.trainer
    before = (trainer.samples_trained, trainer.steps, dict(trainer.rejected), trainer.metrics())
    labelled = [{**q, "label": "7"} for q in QUERIES]
    status, body = post(paused.url, labelled)
    assert status == 200
    assert post(paused.url, QUERIES)[1]["probabilities"] == body["probabilities"]
    assert "7" not in trainer.classes
    after = (trainer.samples_trained, trainer.steps, dict(trainer.rejected), trainer.metrics())
    assert after == before


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"x1": float("nan"), "x2": 0.0}, "non_finite"),
        ({"x1": 1e300, "x2": 0.0}, "out_of_range"),
        ({"x1": "seven", "x2": 0.0}, "wrong_type"),
        ({"x1": [1, 2], "x2": 0.0}, "wrong_type"),
        ({"x1": {"nested": 1}}, "wrong_type"),
        ({}, "no_features"),
        ({"colour": "x" * 5000}, "too_large"),
        ("not an object", "not_object"),
        (17, "not_object"),
    ],
)
def test_a_record_the_stream_would_dead_letter_is_refused_with_its_reason(
    paused: Running, record: Any, reason: str
) -> None:
    trainer = paused.service.trainer
    counts = dict(trainer.rejected)
    status, body = post(paused.url, [QUERIES[0], record])
    assert status == 422
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [(1, reason)]
    assert body["rejected"][0]["detail"]
    assert dict(trainer.rejected) == counts  # the stream's counts are not the requests'


def test_too_many_new_features_is_the_streams_limit(paused: Running) -> None:
    limit = paused.service.trainer.config.max_new_features_per_record
    record = {f"n{i}": 1.0 for i in range(limit + 1)}
    status, body = post(paused.url, record)
    assert status == 422
    assert body["rejected"][0]["reason"] == "too_many_new_features"


def _json_headers(body: bytes, content_type: str = "application/json") -> dict[str, str]:
    return {"Content-Type": content_type, "Content-Length": str(len(body))}


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b'{"x1": 1', None, 400),  # truncated JSON
        (b"", None, 400),
        (b"\xff\xfe{}", None, 400),  # not UTF-8
        (b"[" * 100 + b"]" * 100, None, 400),  # nested too deep
        (b"[]", None, 400),
        (b'{"x1": 1}', {"Content-Type": "text/plain", "Content-Length": "9"}, 415),
        (b'{"x1": 1}', {"Content-Length": "9"}, 415),
        (
            b'{"x1": 1}',
            {"Content-Type": "application/json; charset=latin-1", "Content-Length": "9"},
            415,
        ),
        (b'{"x1": 1}', {"Content-Type": "application/json"}, 411),
        (b'{"x1": 1}', {"Content-Type": "application/json", "Content-Length": "-9"}, 411),
        (None, {"Content-Type": "application/json", "Content-Length": str(2 << 20)}, 413),
    ],
)
def test_malformed_requests_are_4xx_with_a_reason(
    paused: Running, body: bytes | None, headers: dict[str, str] | None, status: int
) -> None:
    if headers is None:
        headers = _json_headers(body or b"")
    got, answer = request(paused.url, "POST", "/predict", body, headers)
    assert got == status
    assert isinstance(answer, dict) and answer["error"]


def test_too_many_records_is_413(paused: Running) -> None:
    status, body = post(paused.url, [QUERIES[0]] * 1001)
    assert status == 413
    assert "1000" in body["error"]


def test_other_methods_and_paths(paused: Running) -> None:
    assert request(paused.url, "GET", "/predict")[0] == 405
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert request(paused.url, method, "/predict")[0] == 405
        assert request(paused.url, method, "/metrics")[0] == 405
    assert request(paused.url, "POST", "/model", b"{}", _json_headers(b"{}"))[0] == 404


def test_model_describes_the_live_model(paused: Running) -> None:
    trainer = paused.service.trainer
    status, body = request(paused.url, "GET", "/model")
    assert status == 200
    assert body["task"] == "classification"
    assert body["classes"] == trainer.classes
    assert body["features"] == ["x1", "x2", "colour=red", "colour=green", "colour=blue"]
    assert body["model"]["samples_seen"] == trainer.samples_trained
    assert body["predict_enabled"] is True
    assert body["settings"]["serve_predictions"] is True
    assert body["settings"]["trainer"]["hidden"] == [8]


def test_the_counter_of_requests_counts_by_status(paused: Running) -> None:
    registry = paused.service.registry
    labels = {"run": "default", "code": "422"}
    before = registry.get_sample_value("stream_trainer_predict_requests_total", labels) or 0
    post(paused.url, [{"x1": float("inf")}])
    assert registry.get_sample_value("stream_trainer_predict_requests_total", labels) == before + 1


def test_healthz_fails_within_its_bound_while_the_step_is_stuck(paused: Running) -> None:
    """The fixture's service is stuck inside a batch: /healthz turns 503 once the bound has
    passed since its last poll, and says why; /metrics shows the same age."""
    started = time.monotonic()
    while True:
        status, body = request(paused.url, "GET", "/healthz")
        if status == 503:
            break
        assert status == 200
        assert time.monotonic() - started < LIVENESS_BOUND + 2, "no 503 within the bound"
        time.sleep(0.05)
    assert "not completed an iteration" in body["reason"]
    age = paused.service.registry.get_sample_value(
        "stream_trainer_loop_seconds_since_iteration", {"run": "default"}
    )
    assert age is not None and age > LIVENESS_BOUND
    status, text = request(paused.url, "GET", "/metrics")
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text


def test_healthz_recovers_once_the_loop_turns_and_no_record_is_lost(tmp_path: Path) -> None:
    rows = 2000
    config = _config(tmp_path, _csv(tmp_path / "data.csv", rows), "classification")
    running = Running(PausingService(config, pause_after=5))
    assert running.service.paused.wait(timeout=60)
    deadline = time.monotonic() + LIVENESS_BOUND + 3
    while request(running.url, "GET", "/healthz")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Requests while the loop trains: every one answered, nothing lost from the stream.
    statuses: list[int] = []

    def client() -> None:
        for _ in range(40):
            statuses.append(post(running.url, QUERIES[:1])[0])

    clients = [threading.Thread(target=client) for _ in range(2)]
    running.service.resume.set()
    for c in clients:
        c.start()
    assert request(running.url, "GET", "/healthz")[0] in (200, 503)
    deadline = time.monotonic() + 10
    while request(running.url, "GET", "/healthz")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for c in clients:
        c.join(timeout=60)
    running.thread.join(timeout=60)
    report = running.stop()
    assert statuses.count(200) == 80
    assert report["samples"] == rows
    assert report["rejected_total"] == 0


def test_regression_predictions_are_values(tmp_path: Path) -> None:
    config = _config(tmp_path, _csv(tmp_path / "data.csv", 600, regression=True), "regression")
    running = Running(PausingService(config, pause_after=10))
    try:
        assert running.service.paused.wait(timeout=60)
        status, body = post(running.url, QUERIES[:2])
        assert status == 200
        assert body["probabilities"] is None
        want = running.service.trainer.predict_many([Record(dict(q)) for q in QUERIES[:2]])
        assert body["predictions"] == want
        assert all(isinstance(v, float) for v in body["predictions"])
    finally:
        running.service.resume.set()
        running.stop()


def test_predict_is_off_unless_enabled(tmp_path: Path) -> None:
    config = _config(tmp_path, _csv(tmp_path / "data.csv", 300), "classification",
                     serve_predictions=False)  # fmt: skip
    running = Running(PausingService(config, pause_after=3))
    try:
        assert running.service.paused.wait(timeout=60)
        status, body = post(running.url, QUERIES[0])
        assert status == 404
        assert "--serve-predictions" in body["error"]
        assert request(running.url, "GET", "/model")[1]["predict_enabled"] is False
    finally:
        running.service.resume.set()
        running.stop()


def test_no_model_yet_is_503(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("x1,label\n" + "".join(f"{i},\n" for i in range(50)))  # never a label
    config = _config(tmp_path, path, "classification")
    running = Running(PausingService(config, pause_after=2))
    try:
        assert running.service.paused.wait(timeout=60)
        status, body = post(running.url, {"x1": 1})
        assert status == 503
        assert "no model yet" in body["error"]
    finally:
        running.service.resume.set()
        running.stop()


def test_the_loop_goes_ahead_of_queued_requests() -> None:
    """While a request holds the model, the loop starts waiting; requests keep coming, back to
    back: the loop still takes the model right after the request it waited for."""
    from stream_trainer.service.serving import ModelLock

    lock = ModelLock()
    order: list[str] = []
    holding, loop_waits = threading.Event(), threading.Event()

    def requests() -> None:
        with lock.serving():
            order.append("request")
            holding.set()
            loop_waits.wait(timeout=10)
            time.sleep(0.05)  # the loop is inside training() by now
        for _ in range(200):  # released, and at once asked for again, and again
            with lock.serving():
                order.append("request")

    def step() -> None:
        holding.wait(timeout=10)
        loop_waits.set()
        with lock.training():
            order.append("step")

    threads = [threading.Thread(target=requests), threading.Thread(target=step)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order.index("step") == 1
    assert len(order) == 202


def test_a_request_is_not_starved_by_back_to_back_steps() -> None:
    """The loop steps back to back; a request that starts waiting during a step gets the model
    right after that step."""
    from stream_trainer.service.serving import ModelLock

    lock = ModelLock()
    order: list[str] = []
    stepping, request_waits = threading.Event(), threading.Event()

    def loop() -> None:
        with lock.training():
            order.append("step")
            stepping.set()
            request_waits.wait(timeout=10)
            time.sleep(0.05)  # the request is inside serving() by now
        for _ in range(200):
            with lock.training():
                order.append("step")

    def request_() -> None:
        stepping.wait(timeout=10)
        request_waits.set()
        with lock.serving():
            order.append("request")

    threads = [threading.Thread(target=loop), threading.Thread(target=request_)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order.index("request") == 1
    assert len(order) == 202


def test_garbage_is_never_a_server_error(paused: Running) -> None:
    """Random bytes and random JSON shapes: each answered 4xx (or 200 when it happens to be a
    valid record), never 5xx, and the model is left as it was."""
    import random

    rng = random.Random(7)
    trainer = paused.service.trainer
    before = (trainer.samples_trained, dict(trainer.rejected), list(trainer.classes))
    atoms: list[Any] = [None, True, 0, -1.5, 1e308, "", "x1", "red", [], {}]

    def shape(depth: int) -> Any:
        kind = rng.randrange(4 if depth < 4 else 1)
        if kind == 0:
            return rng.choice(atoms)
        if kind == 1:
            return [shape(depth + 1) for _ in range(rng.randrange(3))]
        keys = ["x1", "x2", "colour", "label", "", "\u00e9", "new"]
        return {rng.choice(keys): shape(depth + 1) for _ in range(rng.randrange(4))}

    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(30)]
    bodies += [json.dumps(shape(0)).encode() for _ in range(60)]
    for body in bodies:
        status, answer = request(paused.url, "POST", "/predict", body, _json_headers(body))
        assert status < 500, (body, answer)
        assert status == 200 or answer["error"]
    assert (trainer.samples_trained, dict(trainer.rejected), list(trainer.classes)) == before


def _run_config(argv: list[str], environ: dict[str, str], config: Path | None = None) -> Any:
    from stream_trainer.cli import build_parser
    from stream_trainer.commands.run import service_config

    extra = ["--config", str(config)] if config is not None else []
    return service_config(build_parser().parse_args(["run", *extra, *argv]), environ)


def test_the_settings_come_from_the_file_the_environment_and_the_flags(tmp_path: Path) -> None:
    from stream_trainer.errors import ConfigError

    defaults = _run_config([], {})
    assert (defaults.serve_predictions, defaults.liveness_timeout_seconds) == (False, 60.0)
    toml = tmp_path / "service.toml"
    toml.write_text("serve_predictions = true\nliveness_timeout_seconds = 30.0\n")
    from_file = _run_config([], {}, toml)
    assert (from_file.serve_predictions, from_file.liveness_timeout_seconds) == (True, 30.0)
    env = {
        "STREAM_TRAINER_SERVE_PREDICTIONS": "true",
        "STREAM_TRAINER_LIVENESS_TIMEOUT_SECONDS": "5",
    }
    from_env = _run_config([], env)
    assert (from_env.serve_predictions, from_env.liveness_timeout_seconds) == (True, 5.0)
    flags = _run_config(["--serve-predictions", "--liveness-timeout-seconds", "2.5"], {}, toml)
    assert (flags.serve_predictions, flags.liveness_timeout_seconds) == (True, 2.5)
    with pytest.raises(ConfigError, match=r"liveness_timeout_seconds must be > 0, got 0\.0"):
        _run_config(["--liveness-timeout-seconds", "0"], {})
    with pytest.raises(ConfigError, match="serve_predictions answers POST /predict"):
        _run_config(["--serve-predictions", "--metrics-address", "off"], {})
