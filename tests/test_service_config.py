"""The service's settings: TOML file < environment < flags, closed to unknown keys, typed, and
never showing a secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_trainer.errors import ConfigError
from stream_trainer.service.config import (
    NON_SETTING_ENV,
    ServiceConfig,
    load_service_config,
    mask_url,
)
from stream_trainer.training import TrainerConfig

SECRET = "hunter2-s3cret"

TOML = """
source = "kafka://file:9092/from-file"
group = "file-group"
run_name = "file-run"
max_wait_ms = 10
checkpoint_every_seconds = 5

[trainer]
lr = 0.1
hidden = [8, 8]
seed = 1
norm = "layer"

[kafka]
session_timeout_ms = 30000
client_id = "file-client"
"""


@pytest.fixture
def toml_file(tmp_path: Path) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(TOML)
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


# -- precedence ------------------------------------------------------------------------------


def test_defaults_without_any_layer():
    config = load_service_config(environ={})
    assert config == ServiceConfig()
    assert config.trainer == TrainerConfig()


def test_the_file_overrides_the_defaults(toml_file):
    config = load_service_config(config_file=toml_file, environ={})
    assert (config.group, config.run_name, config.max_wait_ms) == ("file-group", "file-run", 10)
    assert config.checkpoint_every_seconds == 5.0
    assert (config.trainer.lr, config.trainer.hidden, config.trainer.seed) == (0.1, (8, 8), 1)
    assert config.trainer.norm == "layer"
    assert config.kafka == {"session_timeout_ms": 30000, "client_id": "file-client"}


def test_the_environment_overrides_the_file(toml_file):
    environ = {
        "STREAM_TRAINER_GROUP": "env-group",
        "STREAM_TRAINER_MAX_WAIT_MS": "20",
        "STREAM_TRAINER_TRAINER__LR": "0.2",
        "STREAM_TRAINER_TRAINER__HIDDEN": "4,4",
        "STREAM_TRAINER_KAFKA__SESSION_TIMEOUT_MS": "20000",
    }
    config = load_service_config(config_file=toml_file, environ=environ)
    assert (config.group, config.max_wait_ms) == ("env-group", 20)
    assert (config.trainer.lr, config.trainer.hidden) == (0.2, (4, 4))
    assert config.kafka == {"session_timeout_ms": 20000, "client_id": "file-client"}
    # What no layer above touched stays as the file said.
    assert (config.run_name, config.trainer.seed) == ("file-run", 1)


def test_flags_override_the_environment_and_the_file(toml_file):
    environ = {"STREAM_TRAINER_GROUP": "env-group", "STREAM_TRAINER_TRAINER__LR": "0.2"}
    config = load_service_config(
        config_file=toml_file,
        environ=environ,
        flags={"group": "flag-group", "max_wait_ms": 30},
        trainer_flags={"lr": 0.3},
    )
    assert (config.group, config.max_wait_ms, config.trainer.lr) == ("flag-group", 30, 0.3)
    assert (config.run_name, config.trainer.seed) == ("file-run", 1)


def test_target_reaches_the_trainer_unless_the_trainer_names_its_own():
    assert load_service_config(environ={"STREAM_TRAINER_TARGET": "y"}).trainer.target == "y"
    environ = {"STREAM_TRAINER_TARGET": "y", "STREAM_TRAINER_TRAINER__TARGET": "label"}
    assert load_service_config(environ=environ).trainer.target == "label"


# -- unknown keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grup = 'x'\n", r"unknown keys in .*grup.*valid: .*group"),
        ("[trainer]\nlearning_rate = 1\n", r"in \[trainer\].*learning_rate.*valid:.*lr"),
        ("[kafka]\nsession_timeout = 1\n", r"session_timeout \(.*did you mean session_timeout_ms"),
        ("[kafka]\ngroup_id = 'g'\n", r"group_id cannot be set there.*comes from group"),
        ("[kafka.security]\nsasl_password = 1\n", r"unknown Kafka security .*sasl_plain_password"),
    ],
)  # fmt: skip
def test_unknown_toml_keys_are_rejected_with_the_valid_ones(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_service_config(config_file=_write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("STREAM_TRAINER_GRUP", r"variable STREAM_TRAINER_GRUP; settings are .*_TRAINER_GROUP"),
        ("STREAM_TRAINER_TRAINER__LEARNING_RATE", r"setting 'learning_rate'.*_TRAINER__LR"),
        ("STREAM_TRAINER_KAFKA__SESSION_TIMEOUT", r"unknown Kafka setting.*session_timeout_ms"),
        ("STREAM_TRAINER_KAFKA__GROUP_ID", r"group_id cannot be set there"),
    ],
)  # fmt: skip
def test_unknown_environment_variables_are_rejected_with_the_valid_ones(name, expected):
    with pytest.raises(ConfigError, match=expected):
        load_service_config(environ={name: "1"})


def test_the_allowlisted_variables_that_are_not_settings_pass():
    environ = dict.fromkeys(NON_SETTING_ENV, "x")
    environ.update({"PATH": "/bin", "OTHER_TOOL_SETTING": "1"})
    assert load_service_config(environ=environ) == ServiceConfig()
    assert "STREAM_TRAINER_CHECKPOINT_HMAC_KEY" in NON_SETTING_ENV
    with pytest.raises(ConfigError, match=r"not settings: .*STREAM_TRAINER_CHECKPOINT_HMAC_KEY"):
        load_service_config(environ={"STREAM_TRAINER_HMAC_KEY": "x"})


def test_unknown_flags_are_rejected_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown settings: grup; valid: .*group"):
        load_service_config(environ={}, flags={"grup": "x"})
    with pytest.raises(ConfigError, match=r"unknown trainer settings: learning_rate; known: .*lr"):
        load_service_config(environ={}, trainer_flags={"learning_rate": 0.1})


# -- types ---------------------------------------------------------------------------------------


def test_environment_values_are_parsed_as_the_field_types():
    environ = {
        "STREAM_TRAINER_CHECKPOINT_EVERY_RECORDS": "50",
        "STREAM_TRAINER_CHECKPOINT_EVERY_SECONDS": "2.5",
        "STREAM_TRAINER_FRESH_START": "true",
        "STREAM_TRAINER_PROGRESS": "0",
        "STREAM_TRAINER_DEAD_LETTER": "",
        "STREAM_TRAINER_TRAINER__FEATURES": "a, b",
        "STREAM_TRAINER_TRAINER__GRAD_CLIP": "1.5",
        "STREAM_TRAINER_TRAINER__WEIGHT_STANDARDIZATION": "yes",
        "STREAM_TRAINER_TRAINER__NORM_OPTIONS": '{"batch_renorm": {"momentum": 0.05}}',
        "STREAM_TRAINER_KAFKA__CREATE_TOPIC": "on",
        "STREAM_TRAINER_KAFKA__CONNECT_RETRIES": "5",
        "STREAM_TRAINER_KAFKA__CONSUMER_PROCESS": "false",
    }
    config = load_service_config(environ=environ)
    assert config.checkpoint_every_records == 50
    assert config.checkpoint_every_seconds == 2.5
    assert (config.fresh_start, config.progress, config.dead_letter) == (True, False, None)
    assert config.trainer.features == ("a", "b")
    assert config.trainer.grad_clip == 1.5
    assert config.trainer.weight_standardization is True
    assert config.trainer.norm_options == {"batch_renorm": {"momentum": 0.05}}
    assert config.kafka == {"create_topic": True, "connect_retries": 5, "consumer_process": False}


def test_a_norm_from_the_environment_is_the_same_setting_as_from_a_flag():
    """One name stays a name (a 1-tuple would change the checkpoint fingerprint)."""
    from_env = load_service_config(environ={"STREAM_TRAINER_TRAINER__NORM": "layer"})
    from_flag = load_service_config(environ={}, trainer_flags={"norm": "layer"})
    assert from_env.trainer.norm == "layer"
    assert from_env.trainer.fingerprint() == from_flag.trainer.fingerprint()
    per_layer = load_service_config(environ={"STREAM_TRAINER_TRAINER__NORM": "layer,rms"})
    assert per_layer.trainer.norm == ("layer", "rms")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("STREAM_TRAINER_MAX_WAIT_MS", "fast", "_MAX_WAIT_MS='fast' is not a valid int"),
        ("STREAM_TRAINER_CHECKPOINT_EVERY_SECONDS", "1m", "is not a valid float"),
        ("STREAM_TRAINER_FRESH_START", "maybe", "'maybe' is not a valid bool"),
        ("STREAM_TRAINER_TRAINER__HIDDEN", "64,x", r"is not a valid tuple\[int, \.\.\.\]"),
        ("STREAM_TRAINER_TRAINER__GRAD_CLIP", "big", "is not a valid float | None"),
        ("STREAM_TRAINER_TRAINER__NORM_OPTIONS", "momentum=1", "is not a valid Mapping"),
        ("STREAM_TRAINER_KAFKA__SESSION_TIMEOUT_MS", "45s", "_MS='45s' is not a valid int"),
        ("STREAM_TRAINER_KAFKA__SSL_CHECK_HOSTNAME", "sure", "is not a valid bool"),
    ],
)  # fmt: skip
def test_environment_values_of_the_wrong_type_are_clear_errors(name, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_service_config(environ={name: text})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('max_wait_ms = "fast"\n', "max_wait_ms in .* must be int, got 'fast'"),
        ("fresh_start = 1\n", "fresh_start in .* must be bool, got 1"),
        ('[trainer]\nhidden = "64"\n', r"\[trainer\] hidden in .* must be tuple\[int, \.\.\.\]"),
        ('[kafka]\nsession_timeout_ms = "45s"\n', "session_timeout_ms must be int, got '45s'"),
        ("[kafka]\nsasl_plain_password = 12345\n", r"password must be str \| None, got \*\*\*"),
        ('[kafka]\nconsumer_process = "yes"\n', "consumer_process must be bool, got 'yes'"),
    ],
)  # fmt: skip
def test_toml_values_of_the_wrong_type_are_clear_errors(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_service_config(config_file=_write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"log_level": "LOUD"}, "log_level must be one of"),
        ({"log_format": "xml"}, "log_format must be one of"),
        ({"metrics_address": "9100"}, "metrics-address must be HOST:PORT"),
        ({"source": "kafka://broker"}, "kafka://HOST:PORT/TOPIC"),
        ({"max_batch_records": 0}, "max_batch_records must be >= 1, got 0"),
    ],
)
def test_values_are_validated_up_front(settings, expected):
    with pytest.raises(ConfigError, match=expected):
        load_service_config(environ={}, flags=settings)


def test_config_file_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_service_config(config_file=tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_service_config(config_file=_write(tmp_path, "source = \n"), environ={})


# -- secrets -------------------------------------------------------------------------------------


def _secret_config(tmp_path: Path) -> ServiceConfig:
    path = _write(
        tmp_path,
        f'[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
        f'sasl_plain_username = "svc"\nssl_password = "{SECRET}-ssl"\n',
    )
    environ = {
        "STREAM_TRAINER_KAFKA__SASL_PLAIN_PASSWORD": SECRET,
        "STREAM_TRAINER_CHECKPOINT": f"redis://default:{SECRET}@redis:6379/0?prefix=p",
    }
    return load_service_config(config_file=path, environ=environ)


def test_secrets_never_appear_in_describe_or_repr(tmp_path):
    config = _secret_config(tmp_path)
    assert config.kafka["sasl_plain_password"] == SECRET  # the client still gets it
    described = config.describe()
    text = json.dumps(described) + repr(config) + str(config)
    assert SECRET not in text
    assert described["kafka"]["sasl_plain_password"] == "***"
    assert described["kafka"]["ssl_password"] == "***"
    assert described["kafka"]["sasl_plain_username"] == "svc"
    assert described["checkpoint"] == "redis://default:***@redis:6379/0?prefix=p"


def test_secrets_in_a_nested_security_table_are_masked(tmp_path):
    path = _write(tmp_path, f'[kafka.security]\nsasl_plain_password = "{SECRET}"\n')
    config = load_service_config(config_file=path, environ={})
    assert SECRET not in json.dumps(config.describe())
    assert SECRET not in repr(config)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://u:pw@h:1/0", "redis://u:***@h:1/0"),
        ("rediss://:pw@h:1/0?prefix=x", "rediss://:***@h:1/0?prefix=x"),
        ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("file://checkpoints", "file://checkpoints"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked
