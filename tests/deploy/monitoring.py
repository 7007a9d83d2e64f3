"""What the monitoring tests share: the shipped rules and dashboard, and the metric names,
label matchers and jobs their PromQL uses."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from typing import Any

import yaml

from .conftest import DEPLOY, REPO

MONITORING = DEPLOY / "monitoring"
RULE_FILE = MONITORING / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING / "apiproxy-dashboard.json"
PROMTOOL_TESTS = REPO / "tests" / "deploy" / "promtool" / "alerts.test.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
# Grafana's variables, replaced by values of the right type for syntax checks.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$namespace": "apiproxy-system",
    "$peer": ".*",
}
# Words of PromQL that look like identifiers but are not metric names.
KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: ./scripts/ensure-tools installs Debian's prometheus package"
    return found


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULE_FILE.read_text())["spec"]["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    dash: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dash


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Every PromQL text in the dashboard: panel targets and query variables."""
    out = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, f"variable {var['name']}: unexpected query {var['definition']!r}"
            out.append(m.group(1))
    return out


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: dict[str, str]  # label -> value of = and =~ matchers


_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_IDENT = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of a PromQL expression, found without a PromQL parser: strings,
    label matchers, grouping clauses, ranges and numbers are cut away, and any identifier left
    that is not a function call or a keyword is a metric name."""
    found: list[Selector] = []
    text = expr

    def take_braces(m: re.Match[str]) -> str:
        matchers = {k: v for k, op, v in _MATCHER.findall(m.group(2)) if op in ("=", "=~")}
        found.append(Selector(m.group(1), matchers))
        return " "

    text = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", take_braces, text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", " ", text)
    for m in _IDENT.finditer(text):
        if m.group(2) or m.group(1) in KEYWORDS:
            continue
        found.append(Selector(m.group(1), {}))
    return found


def rule_exprs() -> list[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]
