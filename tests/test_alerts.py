"""The chart's alerting rules: valid for Prometheus, documented, and each one tested with promtool.

promtool comes from Debian's `prometheus` package, which `make test` installs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from promql import ALERTS_FILE, REPO, load_alerts, run_promtool

UNIT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yaml"
SEVERITIES = {"critical", "warning", "info"}
ANNOTATIONS = {"summary", "description", "runbook"}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_alerts()["groups"] for rule in group["rules"] if "alert" in rule]


def test_rules_file_is_plain_prometheus() -> None:
    """The chart reads the file with .Files.Get and wraps its groups: nothing but `groups` on top."""
    rules = load_alerts()
    assert set(rules) == {"groups"}
    assert rules["groups"]
    assert all(group["rules"] for group in rules["groups"])
    result = run_promtool("check", "rules", str(ALERTS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_actionable() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity one of {SEVERITIES}"
        assert set(rule.get("annotations", {})) >= ANNOTATIONS, f"{name}: annotations {ANNOTATIONS}"
        assert "for" in rule, f"{name}: say how long the condition must hold (`for: 0m` if at once)"
        # The scrape job's name depends on how Prometheus finds the target: never rely on it.
        assert "job=" not in str(rule["expr"]).replace(" ", ""), f"{name} depends on the scrape job's name"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    assert tests["rule_files"] == [str(Path("..") / ".." / ALERTS_FILE.relative_to(REPO))]
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    for name in (rule["alert"] for rule in alert_rules()):
        own = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in own), f"no test where {name} fires"
        assert any(not case.get("exp_alerts") for case in own), f"no test where {name} stays quiet"
        for case in own:
            for alert in case.get("exp_alerts") or []:
                assert set(alert.get("exp_annotations", {})) >= ANNOTATIONS, f"{name}: test the annotations"
                assert "severity" in alert.get("exp_labels", {}), f"{name}: test the labels"


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
