"""The chart's Grafana dashboard, and the PromQL of the dashboard and the alerts.

Every expression must parse (promtool checks them as recording rules) and read only metrics that the
operator and the aggregator export (the metrics contract, `promql.CONTRACT_METRICS`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from promql import (
    CONTRACT_HISTOGRAMS,
    CONTRACT_METRICS,
    bare_histograms,
    chart_expressions,
    check_expressions,
    dashboard_expressions,
    iter_panels,
    load_dashboard,
    located_chart_expressions,
    metric_names,
    scraped_names,
    substitute_variables,
    tokenize,
    unknown_metrics,
    variable_values,
)

UID = "fedtrain-overview"
TITLE = "fedtrain"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Operator metrics about the operator itself, with no namespace or training label.
OPERATOR_WIDE = {
    "fedtrain_operator_leader",
    "fedtrain_reconcile_duration_seconds_bucket",
    "fedtrain_reconcile_errors_total",
    "process_resident_memory_bytes",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def panels(dashboard: dict[str, Any]) -> list[Any]:
    return [panel for panel in iter_panels(dashboard["panels"]) if panel.get("type") != "row"]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


# --------------------------------------------------------------------------------------------------
# structure


def test_identity(dashboard: dict[str, Any]) -> None:
    # A fixed uid keeps links and provisioning stable across installs; id is Grafana's to assign.
    assert dashboard["uid"] == UID
    assert dashboard["title"] == TITLE
    assert dashboard["schemaVersion"] == 39
    assert dashboard.get("id") is None


def test_template_variables(dashboard: dict[str, Any]) -> None:
    defined = variables(dashboard)
    assert defined["datasource"]["type"] == "datasource"
    assert defined["datasource"]["query"] == "prometheus"
    for name in ("namespace", "training"):
        variable = defined[name]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
        assert variable["query"]["query"].startswith("label_values(")
        assert variable["query"]["query"].endswith(f", {name})")
    assert "$namespace" in defined["training"]["query"]["query"], "trainings of the chosen namespaces"


def test_panels_have_unique_ids_and_a_place(dashboard: dict[str, Any]) -> None:
    every = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in every:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid), f"panel {panel['id']}: gridPos needs h, w, x, y"
        assert grid["w"] > 0, f"panel {panel['id']}"
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, f"panel {panel['id']} leaves the 24 columns"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"


def test_panels_query_the_chosen_datasource(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"] == DATASOURCE, f"panel {panel['id']} {panel['title']!r}"
        assert panel["targets"], f"panel {panel['id']} {panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, f"panel {panel['id']} {target['refId']}"
            assert target["expr"].strip()
        assert panel.get("description"), f"panel {panel['id']} {panel['title']!r}: say what it shows"


def test_variables_used_are_defined(dashboard: dict[str, Any]) -> None:
    values = variable_values(dashboard)
    for _, expr in dashboard_expressions(substituted=False):
        substitute_variables(expr, values)  # raises on an undefined variable


def test_training_panels_follow_the_selection() -> None:
    raw = dashboard_expressions(substituted=False)
    for (where, expr), (_, substituted) in zip(raw, dashboard_expressions(), strict=True):
        if where.startswith("dashboard.json panel") and metric_names(substituted) - OPERATOR_WIDE:
            assert '=~"$namespace"' in expr, f"{where} ignores the selected namespaces"
            assert '=~"$training"' in expr, f"{where} ignores the selected trainings"


# --------------------------------------------------------------------------------------------------
# PromQL of the dashboard and the alerts


def test_expressions_are_valid_promql(tmp_path: Path) -> None:
    located = located_chart_expressions()
    assert len(located) > 30
    problem = check_expressions(located, tmp_path)
    assert problem is None, problem


def test_expressions_read_only_exported_metrics() -> None:
    assert unknown_metrics(chart_expressions(), CONTRACT_METRICS) == set()
    assert bare_histograms(chart_expressions()) == set(), "read histograms through _bucket, _sum or _count"


#: Contract metrics the dashboard and the alerts leave out on purpose, and why.
UNUSED = {
    "fedtrain_aggregator_rounds_closed_total": "fedtrain_rounds_completed_total counts the same closes",
    "process_cpu_seconds_total": "the pods' CPU is better read from the kubelet (cAdvisor)",
    "fedtrain_training_failures_total": "FedTrainTrainingFailed fires on the phase; this counts reasons",
}


def test_dashboard_covers_the_contract() -> None:
    """Every metric of the contract appears in the dashboard or the alerts, unless left out on purpose."""
    used = {name for expr in chart_expressions() for name in metric_names(expr)}
    used |= {name.removesuffix(suffix) for name in used for suffix in ("_bucket", "_sum", "_count")}
    assert CONTRACT_METRICS - used == set(UNUSED)


def test_promtool_rejects_a_bad_expression(tmp_path: Path) -> None:
    problem = check_expressions([("good", "up"), ("bad", "sum by (job) (rate(up[5m])")], tmp_path)
    assert problem is not None
    assert "check:expression_1: bad" in problem


# --------------------------------------------------------------------------------------------------
# the helpers themselves


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('fedtrain_x{namespace="a", training=~"b|c"}', {"fedtrain_x"}),
        ("sum by (le, job) (rate(h_bucket[5m]))", {"h_bucket"}),
        ("sum(rate(a_total[5m])) without (instance) / on (job) group_left (team) b", {"a_total", "b"}),
        ("a * ignoring(pod) group_right b", {"a", "b"}),
        ("a and b or c unless d", {"a", "b", "c", "d"}),
        ("a > bool 1 and on() b offset -5m", {"a", "b"}),
        ('{__name__="metric_by_name", job="x"}', {"metric_by_name"}),
        ('{__name__=~"regex.*"}', set()),
        ('{"utf8.metric", job="x"}', {"utf8.metric"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ("max_over_time(rate(a[5m])[1h:5m])", {"a"}),
        ("rate(job:requests:rate5m[1h30m] @ end())", {"job:requests:rate5m"}),
        ("histogram_quantile(0.9, x) > Inf or y < -NaN", {"x", "y"}),
        ("time() - max by (n) (deadline > 0) > 6e2", {"deadline"}),
        ("count_values('v', a) # a comment naming not_a_metric\n+ b", {"a", "b"}),
        ("SUM BY (le) (a) + Sum(b) By (le)", {"a", "b"}),
        ("absent(x == 1)", {"x"}),
        ("topk(5, a) + quantile(0.5, b) + 0x1F", {"a", "b"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["rate(x[$__rate_interval])", "x ; y", 'x{a="b"', "sum(x"])
def test_metric_names_refuses_what_is_not_promql(expr: str) -> None:
    with pytest.raises(ValueError, match=r"unexpected|never closed"):
        metric_names(expr)


def test_tokenize_reads_durations_and_numbers() -> None:
    kinds = [(token.kind, token.text) for token in tokenize("a[1h30m:5m] offset 10s > 1.5e3")]
    assert {("duration", "1h30m"), ("duration", "5m"), ("duration", "10s")} <= set(kinds)
    assert {("number", "1.5e3"), ("operator", ":")} <= set(kinds)


def test_substitute_variables() -> None:
    values = {"namespace": ".*", "window": "3h", "__rate_interval": "4m"}
    expr = 'sum(rate(a{namespace=~"$namespace", b="${namespace:regex}"}[$__rate_interval])) / c[$window]'
    assert substitute_variables(expr, values) == 'sum(rate(a{namespace=~".*", b=".*"}[4m])) / c[3h]'
    # A regex group reference is not a variable.
    assert substitute_variables('label_replace(a, "d", "$1", "s", "(.*)")', values).count("$1") == 1
    with pytest.raises(KeyError, match="undefined_variable"):
        substitute_variables("a{b=~'$undefined_variable'}", values)


def test_unknown_metrics_against_a_real_exposition() -> None:
    """The comparison works on names scraped from prometheus-client, as it will against the services."""
    registry = CollectorRegistry()
    Counter("fedtrain_demo_jobs", "c", ["outcome"], registry=registry).labels(outcome="failed").inc()
    Histogram("fedtrain_demo_seconds", "h", registry=registry).observe(1.0)
    Gauge("fedtrain_demo_round", "g", registry=registry).set(3)
    scraped = scraped_names(generate_latest(registry).decode())
    exprs = [
        'increase(fedtrain_demo_jobs_total{outcome="failed"}[1h])',
        "histogram_quantile(0.9, sum by (le) (rate(fedtrain_demo_seconds_bucket[5m])))",
        "rate(fedtrain_demo_seconds_sum[5m]) / rate(fedtrain_demo_seconds_count[5m])",
        "fedtrain_demo_round and on (instance) up",
    ]
    assert unknown_metrics(exprs, scraped) == set()
    assert unknown_metrics(["fedtrain_demo_jobs", "fedtrain_demo_seconds", "fedtrain_typo"], scraped) == {
        "fedtrain_demo_jobs",  # a counter's series ends in _total
        "fedtrain_demo_seconds",  # a histogram has no series of its family's name
        "fedtrain_typo",
    }
    # Family names (the contract's form) accept the histogram's series.
    assert unknown_metrics(["fedtrain_demo_seconds_bucket"], {"fedtrain_demo_seconds"}) == set()


def test_contract_histograms_are_contract_metrics() -> None:
    assert CONTRACT_HISTOGRAMS <= CONTRACT_METRICS
    assert all(re.fullmatch(r"[a-z_:][a-z0-9_:]*", name) for name in CONTRACT_METRICS)
