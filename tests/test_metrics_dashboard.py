"""The metric names the index exports (pure helpers) and the Grafana dashboard that reads them.

Every series a dashboard panel queries must be one the code exports, with labels the code sets; every metric
the code exports must appear on the dashboard. (tests/test_metrics_export.py checks that the exported names
really reach Ray's Prometheus endpoint.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raybackfill.index.metrics import (
    ETA,
    ITEMS,
    METRICS,
    ROUTER_METRICS,
    SHARD_METRICS,
    WRITE_SECONDS,
    WRITTEN,
    MetricSpec,
    eta_value,
    exported_names,
    phase_values,
    shard_labels,
)
from raybackfill.index.router import RouterConfig
from raybackfill.types import Phase, Space

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "raybackfill-index.json"


# ----------------------------------------------------------------------------- pure helpers
def test_exported_names_follow_rays_prometheus_naming():
    assert exported_names(ITEMS) == ("ray_raybackfill_items",)
    assert exported_names(WRITTEN) == ("ray_raybackfill_written_items_total",)
    assert exported_names(WRITE_SECONDS) == (
        "ray_raybackfill_write_seconds_bucket",
        "ray_raybackfill_write_seconds_sum",
        "ray_raybackfill_write_seconds_count",
    )
    with pytest.raises(ValueError, match="unknown metric kind"):
        exported_names(MetricSpec("x", "summary", "", ()))  # type: ignore[arg-type]


def test_metric_names_are_unique_valid_and_tagged_with_the_index():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names)) and set(METRICS) == set(ROUTER_METRICS) | set(SHARD_METRICS)
    for spec in METRICS:
        assert re.fullmatch(r"raybackfill_[a-z_]+", spec.name) and "index" in spec.tag_keys
    assert all("shard" in spec.tag_keys for spec in SHARD_METRICS)


def test_phase_values_are_one_hot_over_every_phase():
    for phase in Phase:
        values = phase_values(phase)
        assert set(values) == {p.value for p in Phase}
        assert values[phase.value] == 1.0 and sum(values.values()) == 1.0


def test_eta_value_marks_unknown_as_minus_one():
    assert eta_value(None) == -1.0
    assert eta_value(0.0) == 0.0
    assert eta_value(12.5) == 12.5


def test_shard_labels_recover_the_index_from_the_shard_actor_name():
    config = RouterConfig(name="my-index")
    assert shard_labels(config.shard_name(7)) == ("my-index", "my-index-shard-007")
    assert shard_labels("name-with-shard-in-it-shard-001") == (
        "name-with-shard-in-it",
        "name-with-shard-in-it-shard-001",
    )
    assert shard_labels("") == ("", "unnamed")
    assert shard_labels("not-a-shard") == ("not-a-shard", "not-a-shard")


# ----------------------------------------------------------------------------- the dashboard
def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return found


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


EXPORTED = {name: spec for spec in METRICS for name in exported_names(spec)}
SERIES = re.compile(r"\bray_raybackfill_\w+")
LABEL_LISTS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _labels_of(expr: str) -> tuple[set[str], dict[str, set[str]]]:
    """Labels an expression groups by or matches on, and the literal values it matches them to."""
    grouped = {label.strip() for group in LABEL_LISTS.findall(expr) for label in group.split(",") if label.strip()}
    values: dict[str, set[str]] = {}
    for body in MATCHERS.findall(expr):
        for label, op, value in MATCHER.findall(body):
            grouped.add(label)
            if op == "=":
                values.setdefault(label, set()).add(value)
    return grouped, values


def test_every_series_on_the_dashboard_is_one_the_code_exports_with_the_labels_it_sets():
    vocabulary = {"state": {s.value for s in Space}, "phase": {p.value for p in Phase}}
    vocabulary["operation"] = {"load_old", "upsert", "search"}
    exprs = _expressions(_dashboard())
    assert exprs
    for expr in exprs:
        series = SERIES.findall(expr)
        assert series, expr
        unknown = [s for s in series if s not in EXPORTED]
        assert not unknown, f"{expr}: not exported by raybackfill.index.metrics: {unknown}"
        allowed = {key for s in series for key in EXPORTED[s].tag_keys}
        allowed |= {"le"} if any(s.endswith("_bucket") for s in series) else set()
        grouped, values = _labels_of(expr)
        assert grouped <= allowed, f"{expr}: labels {grouped - allowed} are not set on {series}"
        for label, literal in values.items():
            assert literal <= vocabulary.get(label, literal), f"{expr}: {label} is never {literal}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_every_exported_metric_has_a_panel():
    shown = {series for expr in _expressions(_dashboard()) for series in SERIES.findall(expr)}
    missing = [spec.name for spec in METRICS if not set(exported_names(spec)) & shown]
    assert missing == []
    assert {exported_names(ETA)[0], "ray_raybackfill_query_seconds_bucket"} <= shown


def test_the_dashboard_is_importable_grafana_json():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["index"]["type"] == "query"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24 and position["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all('index=~"$index"' in t["expr"] for t in panel["targets"])


# ----------------------------------------------------------------------------- scraping
def test_the_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod():
    import yaml

    monitor = yaml.safe_load((DASHBOARD.parents[1] / "prometheus" / "podmonitor.yaml").read_text())
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    templates = 0
    for path in sorted((DASHBOARD.parents[1] / "kubernetes").rglob("*.yaml")):
        text = path.read_text()
        for doc in yaml.safe_load_all(text):
            if not doc or not doc["apiVersion"].startswith("ray.io/"):
                continue
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            if "headGroupSpec" not in spec:
                continue  # a RayJob on an existing cluster
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                template = group["template"]
                assert selector.items() <= template["metadata"]["labels"].items(), path
                ports = [p for c in template["spec"]["containers"] for p in c["ports"]]
                assert {"containerPort": 8080, "name": endpoint["port"]} in ports, path
                templates += 1
    assert templates >= 8


def test_prometheus_reads_rays_own_service_discovery_file():
    import ray._private.ray_constants as ray_constants
    import yaml

    config = yaml.safe_load((DASHBOARD.parents[1] / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (files,) = job["file_sd_configs"]
    assert files["files"] == [f"/tmp/ray/{ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
