"""Settings and pure helpers behind the Kafka recovery paths (the broker-side behaviour is in
``tests/integration/test_kafka_recovery.py``)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any

import pytest

from consumers import KafkaSourceConfig
from consumers.dead_letter import CUT_DOWN_HEAD_BYTES, cut_down_value
from stream_trainer.errors import ConfigError, SourceError
from stream_trainer.records import RejectedRecord, RejectReason
from stream_trainer.service import TrainerService, load_service_config
from stream_trainer.service.runner import _parse_commit_metadata

KUBERNETES = {
    "STREAM_TRAINER_SERVICE_HOST": "10.0.0.11",
    "STREAM_TRAINER_SERVICE_PORT": "9100",
    "STREAM_TRAINER_SERVICE_PORT_METRICS": "9100",
    "STREAM_TRAINER_PORT": "tcp://10.0.0.11:9100",
    "STREAM_TRAINER_PORT_9100_TCP": "tcp://10.0.0.11:9100",
    "STREAM_TRAINER_PORT_9100_TCP_ADDR": "10.0.0.11",
    "STREAM_TRAINER_PORT_9100_TCP_PORT": "9100",
    "STREAM_TRAINER_PORT_9100_TCP_PROTO": "tcp",
}


def test_variables_kubernetes_injects_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="stream_trainer.service.config"):
        config = load_service_config(
            environ={**KUBERNETES, "STREAM_TRAINER_CHECKPOINT_EVERY_RECORDS": "7"}
        )
    assert config.checkpoint_every_records == 7
    warned = {r.args[0] for r in caplog.records if r.args}
    assert warned == set(KUBERNETES)


@pytest.mark.parametrize(
    "name",
    [
        "STREAM_TRAINER_CHECKPOINT_EVERY_RECORD",  # a setting misspelt
        "STREAM_TRAINER_SERVICE",
        "STREAM_TRAINER_PORTS",
        "STREAM_TRAINER_PORT_9100",
        "STREAM_TRAINER_PORT_9100_TCP_HOST",
    ],
)
def test_other_unknown_variables_still_stop_startup(name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}"):
        load_service_config(environ={**KUBERNETES, name: "5"})


def test_allow_rollback_and_instance_id_come_from_every_layer(tmp_path: Any) -> None:
    config = load_service_config(
        environ={"STREAM_TRAINER_ALLOW_ROLLBACK": "true", "STREAM_TRAINER_INSTANCE_ID": "pod-0"}
    )
    assert (config.allow_rollback, config.instance_id) == (True, "pod-0")
    toml = tmp_path / "service.toml"
    toml.write_text('allow_rollback = true\ninstance_id = "pod-1"\n')
    config = load_service_config(config_file=toml, flags={"instance_id": "pod-2"}, environ={})
    assert (config.allow_rollback, config.instance_id) == (True, "pod-2")
    assert load_service_config(environ={}).allow_rollback is False


def test_static_membership_id_is_validated_and_given_once() -> None:
    config = KafkaSourceConfig("127.0.0.1:9092", "clicks", group_instance_id="trainer-0.a_b")
    assert config.consumer_configs()["group_instance_id"] == "trainer-0.a_b"
    assert (
        KafkaSourceConfig("127.0.0.1:9092", "clicks").consumer_configs()["group_instance_id"]
        is None
    )
    for bad in ("", ".", "..", "a b", "x" * 250, "pod/0"):
        with pytest.raises(ConfigError, match="group_instance_id"):
            KafkaSourceConfig("127.0.0.1:9092", "clicks", group_instance_id=bad)
    with pytest.raises(ConfigError, match="static membership id once"):
        load_service_config(
            flags={"instance_id": "a"}, environ={"STREAM_TRAINER_KAFKA__GROUP_INSTANCE_ID": "b"}
        )


@pytest.mark.parametrize(
    ("note", "expected"),
    [
        ('{"v":7,"origin":120}', (7, 120)),
        ('{"v":7,"origin":null}', (7, None)),
        ('{"v":7}', (7, None)),
        ("", (None, None)),
        ("not json", (None, None)),
        ("[1, 2]", (None, None)),
        ('{"v":true,"origin":false}', (None, None)),
        ('{"v":0,"origin":-1}', (None, None)),
        ('{"v":"7","origin":"1"}', (None, None)),
        ('{"v":7,"origin":1.5}', (7, None)),
        ('{"v":7,"pad":"' + "x" * 2000 + '"}', (None, None)),
        ("[" * 100_000, (None, None)),
    ],
)
def test_commit_metadata_is_parsed_as_untrusted_input(
    note: str, expected: tuple[int | None, int | None]
) -> None:
    assert _parse_commit_metadata(note) == expected


def test_a_cut_down_letter_identifies_the_record_in_a_few_hundred_bytes() -> None:
    raw = b"\x00\xff" + b"y" * (5 << 20)
    key = b"k" * 5000
    rejected = RejectedRecord(
        reason=RejectReason.TOO_LARGE,
        detail="value of 5242882 bytes exceeds max_record_bytes",
        raw=raw,
        key=key,
        topic="clicks",
        partition=2,
        offset=41,
        timestamp_ms=1_700_000_000_000,
        headers=[("h", b"z" * 10_000)],
    )
    value = cut_down_value(rejected, "MessageSizeTooLargeError('too big')")
    assert len(value) < 3000
    body = json.loads(value)
    assert body["source"] == {
        "topic": "clicks",
        "partition": 2,
        "offset": 41,
        "timestamp_ms": 1_700_000_000_000,
    }
    assert (body["reason"], body["length"]) == ("too_large", len(raw))
    assert body["sha256"] == hashlib.sha256(raw).hexdigest()
    assert base64.b64decode(body["head"]) == raw[:CUT_DOWN_HEAD_BYTES]
    assert (body["key_length"], body["key_sha256"]) == (5000, hashlib.sha256(key).hexdigest())
    assert body["refused"].startswith("MessageSizeTooLargeError")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _UnreachableSource:
    """A source whose lag query fails while ``down`` (the timings are the service's)."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.calls: list[float] = []
        self.down = True

    def lag(self) -> dict[str, int]:
        self.calls.append(self.clock.now)
        if self.down:
            raise SourceError("cannot compute lag: timed out", retriable=True)
        return {"clicks:0": 3}


def test_lag_queries_come_ever_less_often_while_they_fail() -> None:
    config = load_service_config(
        flags={
            "source": "kafka://127.0.0.1:1/clicks",
            "checkpoint": "memory://",
            "metrics_address": "off",
        },
        trainer_flags={"target": "label", "task": "classification"},
        environ={},
    )
    clock = _Clock()
    service = TrainerService(config, clock=clock)
    assert service._ensure_metrics() is not None
    source = _UnreachableSource(clock)
    service.source = source
    for t in range(200):
        clock.now = float(t)
        service._report_lag()
    # every 5 s, then 10, 20, 40 and at most 60 s apart while the broker is away
    assert source.calls == [5.0, 15.0, 35.0, 75.0, 135.0, 195.0]
    source.down = False
    for t in range(200, 300):
        clock.now = float(t)
        service._report_lag()
    assert source.calls[6:9] == [255.0, 260.0, 265.0]
    samples = [
        s
        for metric in service.registry.collect()
        if metric.name == "stream_trainer_consumer_lag_records"
        for s in metric.samples
    ]
    assert [(s.labels["topic"], s.labels["partition"], s.value) for s in samples] == [
        ("clicks", "0", 3.0)
    ]


def test_the_run_command_takes_allow_rollback_and_instance_id() -> None:
    from stream_trainer.cli import build_parser
    from stream_trainer.commands.run import service_config

    args = build_parser().parse_args(
        ["run", "--source", "kafka://127.0.0.1:9092/clicks", "--allow-rollback",
         "--instance-id", "trainer-0"]
    )  # fmt: skip
    config = service_config(args, {})
    assert (config.allow_rollback, config.instance_id) == (True, "trainer-0")
    plain = service_config(build_parser().parse_args(["run"]), {})
    assert (plain.allow_rollback, plain.instance_id) == (False, None)
