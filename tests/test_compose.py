"""docker-compose.yml is checked here because no Docker engine runs the tests: it must validate
against the Compose Specification, pin its images, mount files that exist, wait on healthchecks
that exist, and call the ``stream-trainer`` commands with flags they accept."""

from __future__ import annotations

import argparse
import functools
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from stream_trainer.telemetry.http import parse_metrics_address

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests/data/compose-spec.json"
DOCKERFILE = ROOT / "Dockerfile"

# registry/name:tag or name@sha256:digest; the tag must not float.
_IMAGE = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._/-]*)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$"
)
_FLOATING_TAGS = {"latest", "stable", "main", "master", "edge", "nightly"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def test_vendored_schema_is_the_compose_spec():
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    assert "compose-spec/compose-spec" in schema["$comment"]
    assert re.search(r"commit [0-9a-f]{40}", schema["$comment"])
    jsonschema.Draft7Validator.check_schema(schema)


def test_compose_file_validates_against_the_compose_spec(compose):
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_rejects_what_compose_would_reject(compose):
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["trainer"]["depends_on"]["kafka"]["condition"] = "service_ready"
    broken["services"]["redis"]["healthchek"] = {}
    messages = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken)]
    assert len(messages) == 2, messages


def test_the_stack_has_the_expected_services(services):
    assert set(services) == {"kafka", "redis", "replayer", "trainer", "prometheus", "grafana"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_every_image_has_a_pinned_tag(services):
    for name, service in services.items():
        image = service.get("image")
        assert image or "build" in service, f"{name} has neither image nor build"
        if image is None:
            continue
        match = _IMAGE.match(image)
        assert match, f"{name}: cannot parse image {image!r}"
        assert match["tag"] or "@sha256:" in image, f"{name}: {image!r} has no tag"
        assert match["tag"] not in _FLOATING_TAGS, f"{name}: {image!r} floats"


def test_built_image_tag_is_the_project_version(services):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name in ("trainer", "replayer"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        assert services[name]["image"] == f"stream-trainer:{version}"


def test_dockerfile_base_image_is_pinned_python_311_slim():
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert bases, "Dockerfile has no FROM"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_every_bind_mount_exists_in_the_repository(compose, services):
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source in named:
                continue
            assert source.startswith("./"), f"{name}: {source!r} is neither ./path nor a volume"
            assert (ROOT / source).exists(), f"{name} mounts {source}, absent from the repository"
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_depends_on_waits_for_healthchecks_that_exist(services):
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert set(services["trainer"]["depends_on"]) == {"kafka", "redis"}
    assert set(services["replayer"]["depends_on"]) == {"kafka"}


def test_services_that_others_wait_on_have_healthchecks(services):
    for name in ("kafka", "redis", "prometheus", "grafana", "trainer"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    trainer_check = " ".join(services["trainer"]["healthcheck"]["test"])
    assert "/healthz" in trainer_check


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_trainer_metrics_port_is_what_prometheus_scrapes_and_the_healthcheck_calls(services):
    command = services["trainer"]["command"]
    host, port = parse_metrics_address(_option(command, "--metrics-address"))
    assert host == "0.0.0.0", "other containers (Prometheus) must reach the trainer"
    config = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets == [f"trainer:{port}"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(services["trainer"]["healthcheck"]["test"])
    assert _option(command, "--source").startswith("kafka://kafka:9092/")
    assert _option(command, "--checkpoint").startswith("redis://redis:6379/")


def test_replayer_feeds_the_topic_the_trainer_reads(services):
    replay = services["replayer"]["command"]
    run = services["trainer"]["command"]
    topic = _option(run, "--source").rsplit("/", 1)[1]
    assert _option(replay, "--topic") == topic
    assert _option(replay, "--bootstrap") == "kafka:9092"


@functools.cache
def _cli_parser() -> argparse.ArgumentParser:
    from stream_trainer.cli import build_parser  # imports every command: slow, so only once

    return build_parser()


def _subcommand_flags(name: str) -> set[str] | None:
    """Option strings of ``stream-trainer <name>``, or None when there is no such command."""
    parser = _cli_parser()
    for action in parser._actions:  # argparse keeps sub-parsers here; no public accessor exists
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(name)
            if sub is None:
                return None
            return {flag for a in sub._actions for flag in a.option_strings}
    return None


@pytest.mark.parametrize(("service", "subcommand"), [("trainer", "run"), ("replayer", "replay")])
def test_compose_commands_use_only_flags_the_cli_lists(services, service, subcommand):
    command = services[service]["command"]
    assert command[:2] == ["stream-trainer", subcommand]
    flags = _subcommand_flags(subcommand)
    assert flags is not None, f"compose runs `stream-trainer {subcommand}`, which does not exist"
    used = {arg for arg in command[2:] if arg.startswith("--")}
    unknown = used - flags
    assert not unknown, f"{service} passes {sorted(unknown)}, not in `{subcommand} --help`"


def test_kafka_is_the_version_the_tests_run(services):
    from tests.fixtures.kafka import load_broker

    tag = services["kafka"]["image"].split(":", 1)[1]
    assert tag == load_broker().KAFKA_VERSION
    pom = (ROOT / "scripts/kafka/pom.xml").read_text()
    assert f"<kafka.version>{tag}</kafka.version>" in pom


def test_the_demo_keeps_flowing(services):
    """The replayer loops at a steady rate and is restarted if it stops; the trainer waits for
    the topic the replayer creates instead of failing while it does not exist yet."""
    replay = services["replayer"]["command"]
    assert "--loop" in replay and float(_option(replay, "--rate")) > 0
    assert "--create-topic" in replay
    assert services["replayer"]["restart"] == "unless-stopped"
    run = services["trainer"]["command"]
    assert float(_option(run, "--wait-for-topic")) >= 60
    assert "--stop-at-end" not in run
