"""PromQL helpers for the tests of the chart's alerts and dashboard.

`chart_expressions()` collects every PromQL expression of `charts/fedtrain/files/alerts.yaml` and
`dashboard.json` (Grafana variables substituted, so that each parses); `metric_names()` lists the
metric names an expression reads; `unknown_metrics()` compares them with the names the code exports.
The lexer follows the PromQL grammar closely enough to tell a metric name from a function, a keyword,
a label name in a matcher or a grouping list, a string, a number or a duration.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART_FILES = REPO / "charts" / "fedtrain" / "files"
ALERTS_FILE = CHART_FILES / "alerts.yaml"
DASHBOARD_FILE = CHART_FILES / "dashboard.json"

#: The names of the metrics contract (issue 4) as Prometheus sees them: counters with `_total`,
#: histograms by their family name (their series add `_bucket`, `_sum`, `_count`). The offline tests use
#: it; tests/test_metrics.py checks it against what a running operator and aggregator declare.
CONTRACT_METRICS: frozenset[str] = frozenset(
    {
        # the operator
        "fedtrain_training_phase",
        "fedtrain_training_round",
        "fedtrain_training_rounds",
        "fedtrain_training_round_deadline_timestamp_seconds",
        "fedtrain_rounds_completed_total",
        "fedtrain_training_waiting",
        "fedtrain_training_failures_total",
        "fedtrain_round_duration_seconds",
        "fedtrain_site_jobs_total",
        "fedtrain_stragglers_total",
        "fedtrain_secure_aggregation_dropouts_recovered_total",
        "fedtrain_updates_rejected_total",
        "fedtrain_round_update_bytes",
        "fedtrain_site_round_update_bytes",
        "fedtrain_site_round_left_out",
        "fedtrain_site_round_trimmed_share",
        "fedtrain_privacy_epsilon",
        "fedtrain_validation_accuracy",
        "fedtrain_validation_loss",
        "fedtrain_validation_macro_f1",
        "fedtrain_test_accuracy",
        "fedtrain_test_macro_f1",
        "fedtrain_test_ece",
        "fedtrain_site_test_accuracy",
        "fedtrain_site_validation_accuracy",
        "fedtrain_site_validation_loss",
        "fedtrain_site_train_loss",
        "fedtrain_site_train_accuracy",
        "fedtrain_site_samples_per_second",
        "fedtrain_site_train_seconds",
        "fedtrain_reconcile_duration_seconds",
        "fedtrain_reconcile_errors_total",
        "fedtrain_operator_leader",
        # the aggregator
        "fedtrain_aggregator_updates_total",
        "fedtrain_aggregator_update_bytes_total",
        "fedtrain_aggregator_update_norm",
        "fedtrain_aggregator_fold_seconds",
        "fedtrain_aggregator_close_seconds",
        "fedtrain_aggregator_rounds_closed_total",
        "fedtrain_aggregator_round",
        "fedtrain_aggregator_requests_total",
        # prometheus-client's process collector, in both
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }
)

#: The contract's histograms: only their `_bucket`, `_sum` and `_count` series exist.
CONTRACT_HISTOGRAMS: frozenset[str] = frozenset(
    {
        "fedtrain_round_duration_seconds",
        "fedtrain_reconcile_duration_seconds",
        "fedtrain_aggregator_update_norm",
        "fedtrain_aggregator_fold_seconds",
        "fedtrain_aggregator_close_seconds",
    }
)

#: Series Prometheus writes itself, for every target or rule, whatever the target exports.
PROMETHEUS_SERIES: frozenset[str] = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

#: Grafana's built-in variables, as values that parse where Grafana would put them.
GRAFANA_BUILTINS: dict[str, str] = {
    "__rate_interval": "4m",
    "__interval": "1m",
    "__range": "6h",
    "__interval_ms": "60000",
    "__range_s": "21600",
    "__range_ms": "21600000",
}

# --------------------------------------------------------------------------------------------------
# promtool


def promtool() -> str:
    """promtool's path; a missing one fails the test (it never skips: CI must run these checks)."""
    path = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if path is None:
        pytest.fail(
            "promtool is not installed: `make test` installs it (Debian's prometheus package), or run "
            "`sudo apt-get install --no-install-recommends prometheus`"
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, check=False)


def check_expressions(located: list[tuple[str, str]], scratch: Path) -> str | None:
    """promtool's verdict on expressions, written as recording rules: None if all parse, else its
    complaint with the rule numbers mapped back to where each expression comes from."""
    rules = {
        "groups": [
            {
                "name": "expressions",
                "rules": [
                    {"record": f"check:expression_{i}", "expr": expr} for i, (_, expr) in enumerate(located)
                ],
            }
        ]
    }
    path = scratch / "expressions.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = run_promtool("check", "rules", str(path))
    if result.returncode == 0:
        return None
    legend = "\n".join(f"check:expression_{i}: {where}" for i, (where, _) in enumerate(located))
    return f"{result.stdout}{result.stderr}\n{legend}"


# --------------------------------------------------------------------------------------------------
# lexer

GROUPING_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OPERATOR_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
NUMBER_KEYWORDS = frozenset({"inf", "nan"})

MATCH_OPERATORS = frozenset({"=", "!=", "=~", "!~"})

_UNIT = r"(?:ms|[smhdwy])"
_TOKEN = re.compile(
    "|".join(
        [
            r"(?P<space>\s+|#[^\n]*)",
            r"(?P<string>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`)",
            rf"(?P<duration>\d+{_UNIT}(?:\d+{_UNIT})*(?![\w.]))",
            r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)",
            r"(?P<identifier>[a-zA-Z_:][a-zA-Z0-9_:]*)",
            r"(?P<operator>==|!=|<=|>=|=~|!~|[-+*/%^<>=@,(){}\[\]:])",
        ]
    )
)


@dataclass(frozen=True)
class Token:
    kind: str  # string, duration, number, identifier, operator
    text: str
    position: int


def tokenize(expr: str) -> list[Token]:
    """The tokens of a PromQL expression; a character PromQL does not know raises ValueError."""
    tokens: list[Token] = []
    position = 0
    brackets = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"unexpected {expr[position]!r} at {position} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        text = match.group()
        if kind == "identifier" and brackets and text.startswith(":"):
            # In a subquery `[5m:1m]` the colon separates; it does not start a recording-rule name.
            tokens.append(Token("operator", ":", position))
            position += 1
            continue
        if kind != "space":
            tokens.append(Token(kind, text, position))
            if text == "[":
                brackets += 1
            elif text == "]":
                brackets -= 1
        position = match.end()
    return tokens


def _string_value(token: Token) -> str:
    if token.text.startswith("`"):
        return token.text[1:-1]
    body = token.text[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


def _matchers(tokens: list[Token], start: int) -> tuple[set[str], int]:
    """Metric names given inside `{...}` (`__name__="x"`, or a quoted name), and the index after `}`."""
    names: set[str] = set()
    index = start + 1
    while index < len(tokens) and tokens[index].text != "}":
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.kind in {"identifier", "string"} and following and following.text in MATCH_OPERATORS:
            value = tokens[index + 2] if index + 2 < len(tokens) else None
            if value is None or value.kind != "string":
                raise ValueError(f"a label matcher needs a string value at {token.position}")
            label = token.text if token.kind == "identifier" else _string_value(token)
            if label == "__name__" and following.text == "=":
                names.add(_string_value(value))
            index += 3
        elif token.kind == "string":  # {"metric.name", ...}: a quoted metric name
            names.add(_string_value(token))
            index += 1
        elif token.text == ",":
            index += 1
        else:
            raise ValueError(f"unexpected {token.text!r} in a label matcher at {token.position}")
    if index >= len(tokens):
        raise ValueError("a `{` is never closed")
    return names, index + 1


def _skip_parentheses(tokens: list[Token], start: int) -> int:
    """The index after the `)` that closes the `(` at `start`."""
    depth = 0
    for index in range(start, len(tokens)):
        if tokens[index].text == "(":
            depth += 1
        elif tokens[index].text == ")":
            depth -= 1
            if depth == 0:
                return index + 1
    raise ValueError("a `(` is never closed")


def _check_balanced(tokens: list[Token]) -> None:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[Token] = []
    for token in tokens:
        if token.text in {"(", "[", "{"}:
            stack.append(token)
        elif token.text in pairs and (not stack or stack.pop().text != pairs[token.text]):
            raise ValueError(f"unexpected {token.text!r} at {token.position}")
    if stack:
        raise ValueError(f"the {stack[-1].text!r} at {stack[-1].position} is never closed")


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` reads, as written (suffixes such as `_bucket` kept)."""
    tokens = tokenize(expr)
    _check_balanced(tokens)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token.text == "{":
            found, index = _matchers(tokens, index)
            names |= found
            continue
        if token.kind == "identifier":
            keyword = token.text.lower()
            if keyword in GROUPING_KEYWORDS:
                # by (label, ...), on (...), group_left (...): label names, not metrics
                labels_follow = following is not None and following.text == "("
                index = _skip_parentheses(tokens, index + 1) if labels_follow else index + 1
                continue
            if keyword in OPERATOR_KEYWORDS or keyword in NUMBER_KEYWORDS:
                index += 1
                continue
            if following is not None and (
                following.text == "("  # a function or an aggregation
                or following.text.lower() in {"by", "without"}  # sum by (...) (...)
            ):
                index += 1
                continue
            names.add(token.text)
        index += 1
    return names


# --------------------------------------------------------------------------------------------------
# comparing with what the code exports


def unknown_metrics(exprs: Iterable[str], known: Collection[str]) -> set[str]:
    """Metric names the expressions read that are neither in `known` nor written by Prometheus.

    `known` holds names as Prometheus sees them: series names (`x_total`, `h_bucket`, ...) or family
    names; a `_bucket`, `_sum` or `_count` series counts as known when its family is.
    """
    unknown: set[str] = set()
    for expr in exprs:
        for name in metric_names(expr):
            if name in known or name in PROMETHEUS_SERIES:
                continue
            family = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
            if family is not None and family in known:
                continue
            unknown.add(name)
    return unknown


def bare_histograms(exprs: Iterable[str], histograms: Collection[str] = CONTRACT_HISTOGRAMS) -> set[str]:
    """Histogram families read without a suffix: Prometheus holds no series of that name."""
    return {name for expr in exprs for name in metric_names(expr) if name in histograms}


def scraped_names(exposition: str) -> set[str]:
    """The series names of a Prometheus text exposition (what a /metrics endpoint returns)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


# --------------------------------------------------------------------------------------------------
# the chart's expressions

#: $name, ${name}, ${name:format} and the old [[name]]; `$1` (a regex group) is no variable.
_VARIABLE = re.compile(
    r"\$\{(?P<braced>[A-Za-z_]\w*)(?::[\w-]+)?\}|\$(?P<plain>[A-Za-z_]\w*)|\[\[(?P<old>\w+)\]\]"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<expr>.+),\s*[A-Za-z_]\w*\s*\)\s*$", re.DOTALL)
_QUERY_RESULT = re.compile(r"^\s*query_result\(\s*(?P<expr>.+)\)\s*$", re.DOTALL)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return dashboard


def load_alerts() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(ALERTS_FILE.read_text())
    return rules


def variable_values(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """A stand-in for each dashboard variable: interval variables their default, others a regex."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "interval":
            current = variable.get("current", {}).get("value") or str(variable["query"]).split(",")[0]
            values[variable["name"]] = str(current).strip()
        else:
            values[variable["name"]] = ".*"
    return values


def substitute_variables(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with `$name`, `${name}`, `${name:format}` and `[[name]]` replaced; an unknown one raises."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["plain"] or match["old"]
        if name not in values:
            raise KeyError(f"{expr!r} uses ${name}, which the dashboard does not define")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def iter_panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def variable_query(variable: Mapping[str, Any]) -> str | None:
    """The PromQL inside a query variable (`label_values(EXPR, label)`, `query_result(EXPR)`)."""
    if variable.get("type") != "query":
        return None
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
    for pattern in (_LABEL_VALUES, _QUERY_RESULT):
        match = pattern.match(text)
        if match:
            return match["expr"]
    return None


def dashboard_expressions(substituted: bool = True) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and query variable of the dashboard."""
    dashboard = load_dashboard()
    values = variable_values(dashboard)
    found: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"dashboard.json panel {panel.get('id')} {panel.get('title')!r} {target.get('refId')}"
                found.append((where, target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        expr = variable_query(variable)
        if expr:
            found.append((f"dashboard.json variable {variable['name']}", expr))
    if substituted:
        found = [(where, substitute_variables(expr, values)) for where, expr in found]
    return found


def alert_expressions() -> list[tuple[str, str]]:
    """(where, expression) of every rule of alerts.yaml."""
    found = []
    for group in load_alerts()["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            found.append((f"alerts.yaml {group['name']}/{name}", str(rule["expr"])))
    return found


def located_chart_expressions() -> list[tuple[str, str]]:
    return alert_expressions() + dashboard_expressions()


def chart_expressions() -> list[str]:
    """Every PromQL expression of the chart's alerts and dashboard, ready to parse."""
    return [expr for _, expr in located_chart_expressions()]
