"""Settings declared once: every ServiceConfig setting is a flag, an environment variable and a
TOML key derived from its field, and all three give the same value."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from stream_trainer.cli import build_parser
from stream_trainer.commands.run import service_config
from stream_trainer.errors import ConfigError
from stream_trainer.service.config import ServiceConfig, load_service_config
from stream_trainer.service.settings import add_setting_arguments, flag_of, parse_text, setting

# A value other than the default for each kind of setting, as text.
_SAMPLES = {
    "group": "g2",
    "checkpoint_every_records": "7",
    "checkpoint_every_seconds": "2.5",
    "fresh_start": None,  # a bool: the flag takes no value
    "progress": None,
    "instance_id": "pod-1",
    "log_format": "json",
    "dist_backend": "gloo",
}


def _settings() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(ServiceConfig) if "help" in f.metadata]


def test_every_setting_but_the_tables_and_target_is_a_flag():
    names = {f.name for f in dataclasses.fields(ServiceConfig)} - {"trainer", "kafka", "target"}
    assert {f.name for f in _settings()} == names
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "run"
    ]
    flags = {option for action in run._actions for option in action.option_strings}
    assert {flag_of(f) for f in _settings()} <= flags


@pytest.mark.parametrize("name", sorted(_SAMPLES))
def test_flag_environment_and_toml_agree(tmp_path, name):
    field = next(f for f in _settings() if f.name == name)
    text = _SAMPLES[name]
    flag = flag_of(field)
    if text is None:  # a bool: the flag flips the default
        value = not field.default
        argv, env_text, toml = [flag], str(value).lower(), str(value).lower()
    else:
        value = parse_text(name, text, field.type)
        argv, env_text = [flag, text], text
        toml = text if isinstance(value, int | float) else f'"{text}"'
    assert value != field.default
    from_flag = service_config(build_parser().parse_args(["run", *argv]), environ={})
    from_env = load_service_config(environ={f"STREAM_TRAINER_{name.upper()}": env_text})
    path = tmp_path / "c.toml"
    path.write_text(f"{name} = {toml}\n")
    from_toml = load_service_config(config_file=path, environ={})
    assert getattr(from_flag, name) == getattr(from_env, name) == getattr(from_toml, name) == value


def test_flags_check_types_and_choices(capsys):
    for argv in (["--max-wait-ms", "soon"], ["--log-format", "xml"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", *argv])
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_a_new_setting_is_one_field():
    @dataclasses.dataclass(frozen=True)
    class Config:
        max_pending: int = setting(100, help="records waiting for their label")
        id_field: str | None = setting(None, help="field that joins a label to its record")
        strict: bool = setting(False, help="refuse late labels")

    parser = argparse.ArgumentParser()
    add_setting_arguments(parser, Config)
    given = vars(parser.parse_args(["--max-pending", "5", "--id-field", "id", "--strict"]))
    assert Config(**given) == Config(max_pending=5, id_field="id", strict=True)
    assert vars(parser.parse_args([])) == {}  # only the flags given
    assert "(default 100)" in parser.format_help()
    with pytest.raises(ConfigError, match="is not a valid int"):
        parse_text("--max-pending", "many", "int")
