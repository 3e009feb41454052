"""deploy/prometheus and deploy/grafana: the alert rules and the dashboard are valid, and every
expression parses (Prometheus's PromQL grammar, from `promql-parser`) and names only metrics
closesync exposes. promtool is not on PyPI; Prometheus's rule-file format is checked here
against its schema (the fields of rulefmt.RuleGroups) instead. No maintained PyPI package
evaluates PromQL (those on PyPI are HTTP clients of a Prometheus or query builders), so the
rules' intent is checked on their parsed trees (which series, grouped by what) rather than by
promtool-style evaluation against samples."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from closesync.store.keys import Keys
from closesync.wiring import metrics
from tests.shells.test_worker_tasks import services_on

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "closesync.json"
# Prometheus's own series, which a rule may use beside closesync's.
PROMETHEUS_SERIES = {"up"}

DURATION = r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
LABELS = {
    "type": "object",
    "propertyNames": {"pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"},
    "additionalProperties": {"type": "string"},
}
# Prometheus's rule file (model/rulefmt): groups of alerting or recording rules, no other field.
RULE_FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "rules"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": DURATION},
                    "query_offset": {"type": "string", "pattern": DURATION},
                    "limit": {"type": "integer", "minimum": 0},
                    "labels": LABELS,
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "additionalProperties": False,
                            "oneOf": [
                                {
                                    "required": ["alert"],
                                    "not": {"required": ["record"]},
                                },
                                {
                                    "required": ["record"],
                                    "not": {
                                        "anyOf": [
                                            {"required": ["for"]},
                                            {"required": ["annotations"]},
                                        ]
                                    },
                                },
                            ],
                            "properties": {
                                "alert": {"type": "string", "minLength": 1},
                                "record": {
                                    "type": "string",
                                    "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                },
                                "expr": {"type": "string", "minLength": 1},
                                "for": {"type": "string", "pattern": DURATION},
                                "keep_firing_for": {"type": "string", "pattern": DURATION},
                                "labels": LABELS,
                                "annotations": LABELS,
                            },
                        },
                    },
                },
            },
        }
    },
}


def rule_file_problems(document: Any) -> list[str]:
    """What is wrong with a rule file: schema errors, then expressions that do not parse."""
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in jsonschema.Draft202012Validator(RULE_FILE_SCHEMA).iter_errors(document)
    ]
    if problems:
        return problems
    names: set[str] = set()
    for group in document["groups"]:
        if group["name"] in names:
            problems.append(f"group {group['name']!r} is defined twice")
        names.add(group["name"])
        for rule in group["rules"]:
            try:
                promql_parser.parse(rule["expr"])
            except ValueError as error:
                problems.append(f"{rule.get('alert') or rule.get('record')}: {error}")
    return problems


def selectors(node: Any) -> Iterator[str]:
    """The metric names an expression's tree selects."""
    name = getattr(node, "name", None)
    if type(node).__name__ == "VectorSelector" and name:
        yield name
    for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from selectors(child)
    for argument in getattr(node, "args", None) or []:
        yield from selectors(argument)


@pytest.fixture
def exposed(redis_client: redis.Redis, keys: Keys) -> set[str]:
    """Every sample name the worker, scheduler and web processes may expose."""
    services = services_on(redis_client, keys)
    everything = [
        *metrics.collectors(services, "worker"),
        *metrics.collectors(services, "web"),
        metrics.SyncIntervalGauge(lambda: {"poll": 300.0}),
    ]
    unique = list({type(c): c for c in everything}.values())
    body, _ = metrics.Exposition(unique).render()
    names = set()
    for family in text_string_to_metric_families(body.decode()):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alerts_file_matches_the_rule_schema_and_every_expr_parses() -> None:
    """deploy/prometheus/alerts.yml is a valid Prometheus rule file."""
    assert rule_file_problems(yaml.safe_load(ALERTS.read_text())) == []


def test_rule_check_a_broken_expr_or_field_is_reported() -> None:
    """The check fails on an expression PromQL cannot parse and on an unknown field."""
    document = yaml.safe_load(ALERTS.read_text())
    document["groups"][0]["rules"][0]["expr"] = "sum(rate(closesync_runs_total[5m]) by"
    assert any("CloseSyncSyncLagHigh" in p for p in rule_file_problems(document))
    document = yaml.safe_load(ALERTS.read_text())
    document["groups"][0]["rules"][0]["summary"] = "misplaced"
    assert rule_file_problems(document)


def test_alerts_cover_the_issue_each_with_a_summary_saying_what_to_do(exposed: set[str]) -> None:
    """Lag, needs_reauth, the 429 ratio, no task completed, refresh failures: each alert has a
    summary and selects only metrics closesync exposes."""
    rules = alert_rules()
    by_name = {rule["alert"]: rule for rule in rules}
    assert {
        "CloseSyncSyncLagHigh",
        "CloseSyncNeedsReauthGrowing",
        "CloseSyncRateLimited",
        "CloseSyncNoTaskCompleted",
        "CloseSyncTokenRefreshFailures",
    } <= set(by_name)
    assert "0.01" in by_name["CloseSyncRateLimited"]["expr"]
    assert "[10m]" in by_name["CloseSyncNoTaskCompleted"]["expr"]
    for rule in rules:
        summary = rule["annotations"]["summary"]
        assert len(summary) > 40, rule["alert"]
        used = set(selectors(promql_parser.parse(rule["expr"])))
        assert used, rule["alert"]
        assert used <= exposed | PROMETHEUS_SERIES, (rule["alert"], used - exposed)


def test_dashboard_is_grafana_json_whose_panels_use_existing_metrics(exposed: set[str]) -> None:
    """Every panel of deploy/grafana/closesync.json has a parsing PromQL target, and together
    they show every closesync metric family."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "closesync"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    shown: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(selectors(promql_parser.parse(target["expr"])))
            assert used, panel["title"]
            assert used <= exposed, (panel["title"], used - exposed)
            shown |= used
    families = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for name in exposed
        # `_created` (a counter's start time, a gauge family of its own in the text format).
        if name.startswith("closesync_") and not name.endswith("_created")
    }
    assert families <= {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in shown}


def test_compose_monitoring_profile_scrapes_worker_scheduler_and_web() -> None:
    """The optional profile runs Prometheus and Grafana images; Prometheus scrapes the metrics
    port of the workers and the scheduler and the web's /metrics, with the alert rules."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    assert "profiles" not in services["worker"]
    port = compose["x-closesync"]["environment"]["METRICS_PORT"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["closesync-worker"]["dns_sd_configs"][0]["port"] == int(port)
    assert jobs["closesync-scheduler"]["static_configs"][0]["targets"] == [f"scheduler:{port}"]
    assert jobs["closesync-web"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = " ".join(services["grafana"]["volumes"])
    assert "./grafana/closesync.json" in mounts
    assert "./grafana/provisioning" in mounts


def test_lag_and_no_task_alerts_are_relative_to_the_interval_and_per_instance() -> None:
    """The lag alert compares the lag with the exported interval (not a hard-coded 600 s, which
    hourly webhook polling exceeds); the no-task alert groups by instance, so one stuck worker
    cannot hide behind others; the refresh alert leaves ok and rotated_elsewhere out."""
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    lag = by_name["CloseSyncSyncLagHigh"]["expr"]
    assert set(selectors(promql_parser.parse(lag))) == {
        "closesync_sync_lag_seconds",
        "closesync_sync_interval_seconds",
    }
    assert "300" not in lag
    assert "600" not in lag
    stuck = promql_parser.parse(by_name["CloseSyncNoTaskCompleted"]["expr"])
    assert "sum by (instance)" in str(stuck)
    refresh = by_name["CloseSyncTokenRefreshFailures"]["expr"]
    assert 'result=~"revoked|client_refused|error"' in refresh
