"""The Prometheus alert rules: valid (``promtool check rules``), each one fired by its unit test
and none by a healthy service (``promtool test rules``), wired into the Prometheus config and
compose, and written over metrics the service exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from stream_trainer.telemetry.metrics import (
    TASKS,
    ServiceMetrics,
    register_loop_age,
    register_process_collectors,
)
from tests.fixtures import service_unavailable

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "dashboards/prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
EXPECTED_ALERTS = {
    "StreamTrainerLoopStalled",
    "StreamTrainerDeadLettersRising",
    "StreamTrainerCheckpointsFailing",
    "StreamTrainerCheckpointStale",
    "StreamTrainerAccuracyDrop",
    "StreamTrainerLagGrowing",
}
_METRIC = re.compile(r"(?<![\w:\"])(stream_trainer_[A-Za-z0-9_:]*)")


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        service_unavailable(
            "promtool", "not on PATH (Debian prometheus; scripts/setup.sh installs it)"
        )
    return path


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", ALERT_TESTS.name],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_unit_test_and_the_healthy_case_covers_all() -> None:
    assert {rule["alert"] for rule in _rules()} == EXPECTED_ALERTS
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            if check["exp_alerts"]:
                fired.add(check["alertname"])
            elif case["name"] == "a healthy service fires nothing":
                quiet.add(check["alertname"])
    assert fired == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def _exported_families() -> set[str]:
    names: set[str] = set()
    for task in TASKS:
        registry = CollectorRegistry()
        ServiceMetrics(registry, run="r", model="m", norm="n", task=task)
        register_loop_age(registry, run="r", age=lambda: 0.0)
        register_process_collectors(registry)
        names.update(family.name for family in registry.collect())
    return names


def test_alerts_use_only_metrics_the_service_exports() -> None:
    exported = _exported_families()
    used = {m for rule in _rules() for m in _METRIC.findall(rule["expr"])}
    families = {re.sub(r"_total$", "", name) for name in used}
    assert families <= exported, f"unknown metrics in alerts.yml: {sorted(families - exported)}"
    assert len(families) >= 7


def test_prometheus_and_compose_load_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./dashboards/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert "./dashboards/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
