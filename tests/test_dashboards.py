"""The Grafana dashboard, its provisioning and the Prometheus config agree with each other, with
docker-compose.yml and with the metrics ServiceMetrics registers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_trainer.telemetry.metrics import TASKS, ServiceMetrics
from tests.fixtures.prometheus import dashboard_queries

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards/grafana/stream-trainer.json"
DATASOURCES = ROOT / "dashboards/provisioning/datasources/prometheus.yml"
PROVIDERS = ROOT / "dashboards/provisioning/dashboards/stream-trainer.yml"
PROMETHEUS_CONFIG = ROOT / "dashboards/prometheus/prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

DASHBOARD_UID = "stream-trainer"
DATASOURCE_UID = "stream-trainer-prometheus"
GRAFANA_11_SCHEMA_VERSIONS = range(39, 42)  # 11.0-11.2 write 39, 11.3-11.4 write 40, 11.5+ 41

# A PromQL identifier that is a metric name of ours (not a label, function or keyword).
_METRIC = re.compile(r"(?<![\w:\"])(stream_trainer_[A-Za-z0-9_:]*)")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list[dict]:
    """Panels that run queries; rows only group them and carry no datasource."""
    return [p for p in panels(dashboard) if p["type"] != "row"]


def _service_registries() -> list[CollectorRegistry]:
    """A registry per task with everything the service exports: ServiceMetrics, the loop age
    and the ``POST /predict`` counter."""
    from stream_trainer.service.serving import LiveModelEndpoint, ModelLock
    from stream_trainer.telemetry.metrics import register_loop_age
    from stream_trainer.training import IncrementalTrainer, TrainerConfig

    registries = []
    for task in TASKS:
        registry = CollectorRegistry()
        ServiceMetrics(registry, run="r", model="m", norm="n", task=task)
        register_loop_age(registry, run="r", age=lambda: 0.0)
        endpoint = LiveModelEndpoint(
            IncrementalTrainer(TrainerConfig(target="y")), ModelLock(), settings={},
            checkpoint_version=lambda: None, registry=registry, run="r",
        )  # fmt: skip
        endpoint.predict({"x": 1.0})  # a counted request: the counter has a sample
        registries.append(registry)
    return registries


def per_process_metrics() -> set[str]:
    """Sample names without a ``norm`` label: the process's, not the model's (the loop age,
    the prediction requests)."""
    names = set()
    for registry in _service_registries():
        for family in registry.collect():
            for sample in family.samples:
                if "norm" not in sample.labels:
                    names.add(sample.name)
    return names


def exported_sample_names() -> set[str]:
    """Every sample name the service can export, over all tasks."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
    }
    for registry in _service_registries():
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


def test_dashboard_has_a_stable_uid_and_a_grafana_11_schema():
    dashboard = load_dashboard()
    assert dashboard["uid"] == DASHBOARD_UID
    assert dashboard["schemaVersion"] in GRAFANA_11_SCHEMA_VERSIONS
    assert "id" not in dashboard or dashboard["id"] is None  # ids are per Grafana instance
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_datasource_provisioning_declares_the_fixed_uid():
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        (DATASOURCE_UID, "prometheus", "http://prometheus:9090")
    ]


def test_every_panel_and_target_references_the_provisioned_datasource():
    dashboard = load_dashboard()
    expected = {"type": "prometheus", "uid": DATASOURCE_UID}
    for panel in query_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, (panel["title"], target["refId"])
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


def test_template_variables_run_and_norm_are_used_by_every_query():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"run", "norm"}
    assert variables["run"]["query"] == "label_values(stream_trainer_records_trained_total, run)"
    assert variables["norm"]["query"] == (
        'label_values(stream_trainer_records_trained_total{run=~"$run"}, norm)'
    )
    for variable in variables.values():
        assert variable["allValue"] == ".*"  # "All" matches every run in the =~ matchers
    unlabelled = per_process_metrics()
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'run=~"$run"' in expr, (panel["title"], expr)
            if not set(_METRIC.findall(expr)) <= unlabelled:
                assert 'norm=~"$norm"' in expr, (panel["title"], expr)
            # Every selector of the expression is filtered, not only the first one.
            selectors = _METRIC.findall(expr)
            assert expr.count('run=~"$run"') == len(selectors), (panel["title"], expr)


def test_every_metric_in_the_dashboard_is_registered_by_service_metrics():
    exported = exported_sample_names()
    used = set()
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            used.update(_METRIC.findall(target["expr"]))
    unknown = used - exported
    assert not unknown, f"dashboard queries metrics nobody exports: {sorted(unknown)}"
    assert len(used) >= 15


def test_the_dashboard_covers_every_exported_metric():
    used = set()
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            used.update(_METRIC.findall(target["expr"]))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    exported = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported_sample_names()}
    # The timestamp is redundant with the age the dashboard shows.
    missing = exported - families - {"stream_trainer_checkpoint_last_success_timestamp_seconds"}
    assert not missing, f"exported but not on the dashboard: {sorted(missing)}"


def test_dashboard_queries_substitutes_every_variable():
    queries = dashboard_queries(DASHBOARD, {"run": "run-1.a", "norm": ["batch_renorm", "ln"]})
    assert queries
    for expr in queries:
        assert "$" not in expr and "[[" not in expr, expr
    assert any(r'run=~"run\\-1\\.a"' in q for q in queries)
    assert any('norm=~"batch_renorm|ln"' in q for q in queries)
    with_vars = dashboard_queries(DASHBOARD, include_template_queries=True)
    assert with_vars[0] == "group by (run) (stream_trainer_records_trained_total)"


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards():
    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert len(providers) == 1
    path = providers[0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert mounts.get(path) == "./dashboards/grafana", mounts
    assert (
        mounts["/etc/grafana/provisioning/datasources"] == "./dashboards/provisioning/datasources"
    )
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./dashboards/provisioning/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"


def test_prometheus_config_scrapes_the_trainer_every_5s():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert targets == ["trainer:9100"]
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) absent")
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(
        ["promtool", "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
