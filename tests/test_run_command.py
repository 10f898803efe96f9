"""``stream-trainer run``: its flags (over the environment and the file), its help, and its logs
(one JSON object per line with ``--log-format json``; never a secret)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from stream_trainer.commands._learner_args import add_learner_arguments
from stream_trainer.errors import ConfigError
from stream_trainer.training import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cret"


@functools.cache
def _parser():
    from stream_trainer.cli import build_parser

    return build_parser()


def _config(argv: list[str], environ: dict[str, str] | None = None):
    from stream_trainer.commands.run import service_config

    return service_config(_parser().parse_args(["run", *argv]), environ or {})


# -- flags ---------------------------------------------------------------------------------------


def test_help_lists_every_flag_the_compose_trainer_uses(capsys):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["trainer"]["command"]
    assert command[:2] == ["stream-trainer", "run"]
    used = [arg for arg in command[2:] if arg.startswith("--")]
    assert used
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["run", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    missing = [flag for flag in used if flag not in help_text]
    assert not missing, f"`stream-trainer run --help` does not list {missing}"
    # And the parser accepts the compose command as it is.
    _parser().parse_args(command[1:])


def test_every_learner_flag_reaches_the_trainer_config():
    """`run` shares the learner flags of `evaluate`: each one given lands in ``config.trainer``
    (a flag whose destination is not a TrainerConfig field would be rejected as an unknown
    setting)."""
    parser = argparse.ArgumentParser()
    add_learner_arguments(parser)
    dests = {a.dest for a in parser._actions} - {"help", "model", "target"}
    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert dests <= fields, sorted(dests - fields)
    config = _config(["--no-momentum-in-samples", "--lr-reference-batch", "4", "--no-skip"])
    trainer = config.trainer
    assert (trainer.momentum_in_samples, trainer.lr_reference_batch, trainer.skip) == (
        False,
        4,
        False,
    )


def test_flags_override_the_environment_which_overrides_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'group = "file"\nrun_name = "file"\nmax_wait_ms = 10\n'
        '[trainer]\nlr = 0.1\nseed = 1\nnorm = "layer"\n'
    )
    environ = {"STREAM_TRAINER_GROUP": "env", "STREAM_TRAINER_TRAINER__LR": "0.2"}
    config = _config(
        ["--config", str(path), "--group", "flag", "--lr", "0.3", "--norm", "rms", "--no-progress"],
        environ,
    )
    assert (config.group, config.trainer.lr, config.trainer.norm) == ("flag", 0.3, "rms")
    assert config.progress is False
    # Flags not given leave the layers below alone (their argparse defaults do not count).
    assert (config.run_name, config.max_wait_ms, config.trainer.seed) == ("file", 10, 1)
    config = _config(["--config", str(path)], environ)
    assert (config.group, config.trainer.lr, config.trainer.norm) == ("env", 0.2, "layer")


def test_learner_flags_are_converted_to_trainer_settings():
    argv = [
        "--features", "a, b", "--hidden", "8,4", "--norm", "layer,rms", "--grad-clip", "0",
        "--target", "y", "--window", "50", "--no-weight-standardization",
    ]  # fmt: skip
    config = _config(argv)
    t = config.trainer
    assert (t.features, t.hidden, t.norm, t.grad_clip) == (
        ("a", "b"),
        (8, 4),
        ("layer", "rms"),
        None,
    )
    assert (t.target, t.rolling_window, t.weight_standardization) == ("y", 50, False)


def test_norm_options_from_the_command_line(capsys):
    """``--norm-option NORM.KEY=VALUE`` (repeatable) sets a norm's option over the defaults, for
    ``run`` and for ``evaluate``; a malformed one is a usage error, an unknown key the norm's own
    ConfigError."""
    from stream_trainer.commands._learner_args import trainer_config

    argv = ["--norm-option", "ema_batch.momentum=0.03", "--norm-option", "layer.bias=false"]
    options = _config(argv).trainer.norm_options
    assert options["ema_batch"] == {"momentum": 0.03}
    assert options["layer"] == {"bias": False}
    assert options["batch_renorm"] == {"momentum": 0.002}  # the default is kept
    args = _parser().parse_args(["evaluate", "--source", "river:Phishing", *argv])
    assert trainer_config(args, "y").norm_options["ema_batch"] == {"momentum": 0.03}
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--norm-option", "momentum=0.03"])
    assert "expected NORM.KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="nope"):
        _config(["--norm-option", "ema_batch.nope=1"])


def test_unknown_flags_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["run", "--grup", "x"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --grup" in capsys.readouterr().err


def test_a_river_baseline_is_refused():
    with pytest.raises(ConfigError, match="run trains the MLP"):
        _config(["--model", "river:hoeffding_tree"])


# -- logs ----------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_log_format_is_one_object_per_line(restore_logging):
    from stream_trainer.service.logs import configure_logging

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    log = logging.getLogger("stream_trainer.test")
    log.info("two\nlines and a url redis://u:%s@h:1/0", SECRET)
    try:
        raise ValueError("boom\nwith a second line")
    except ValueError:
        log.exception("failed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # shown even if an earlier test raised it already
        warnings.warn("a warning goes through logging too", UserWarning, stacklevel=1)
    log.debug("below the level")
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["level"] for r in records] == ["INFO", "ERROR", "WARNING"]
    assert set(records[0]) == {"ts", "level", "logger", "message"}
    assert records[0]["message"] == "two\nlines and a url redis://u:***@h:1/0"
    assert "ValueError: boom" in records[1]["exception"]
    assert "a warning goes through logging too" in records[2]["message"]
    assert SECRET not in stream.getvalue()


def test_text_log_format_masks_url_passwords(restore_logging):
    from stream_trainer.service.logs import configure_logging

    stream = io.StringIO()
    configure_logging("text", "INFO", stream=stream)
    logging.getLogger("stream_trainer.test").warning("cannot reach rediss://:%s@h:1/0", SECRET)
    assert "rediss://:***@h:1/0" in stream.getvalue()
    assert SECRET not in stream.getvalue()


@pytest.mark.integration
def test_a_short_run_logs_json_lines_and_no_secret(tmp_path, redis_server):
    """The whole command, in its own process, with secrets in the environment and in the URL."""
    from stream_trainer.records import Record
    from stream_trainer.sources import open_source

    data = tmp_path / "phishing.jsonl"
    records = [r.value for r in open_source("river:Phishing") if isinstance(r, Record)][:200]
    lines = [json.dumps(v) for v in records] + ["{not json"]
    data.write_text("\n".join(lines) + "\n")
    with redis_server.client() as client:
        client.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_TRAINER_")}
    env.update(
        {
            # The redis-server of the tests has no password: the default user takes any.
            "STREAM_TRAINER_CHECKPOINT": redis_server.url.replace(
                "redis://", f"redis://default:{SECRET}-redis@"
            )
            + "?prefix=logs",
            "STREAM_TRAINER_KAFKA__SASL_PLAIN_PASSWORD": f"{SECRET}-sasl",
            "STREAM_TRAINER_KAFKA__SSL_PASSWORD": f"{SECRET}-ssl",
            "STREAM_TRAINER_LOG_FORMAT": "json",
        }
    )
    command = [
        sys.executable, "-m", "stream_trainer", "run",
        "--source", str(data), "--target", "is_phishing",
        "--dead-letter", str(tmp_path / "dead.jsonl"),
        "--metrics-address", "off", "--no-progress", "--hidden", "8",
        "--report-json", str(tmp_path / "report.json"),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    everything = done.stdout + done.stderr + (tmp_path / "report.json").read_text()
    assert SECRET not in everything
    log_lines = [line for line in done.stderr.splitlines() if line.strip()]
    records_logged = [json.loads(line) for line in log_lines]  # each line is one JSON object
    messages = [r["message"] for r in records_logged]
    assert any("starting run" in m for m in messages)
    assert any("***" in m for m in messages), "the settings are logged, masked"
    assert "samples=200" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["rejected_total"] == 1
