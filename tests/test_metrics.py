"""The operator's metrics: attempts counted once from status changes, a training's series removed, and
every metric the chart's dashboard and alert rules read exported by the running operator or aggregator."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from cluster import running_emulator
from operator_harness import OperatorThread, tiny_training, wait_for
from ports import free_port
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from promql import CONTRACT_METRICS, chart_expressions, unknown_metrics

from fedtrain.api import (
    ConditionType,
    EvalMetrics,
    FederatedTrainingStatus,
    Phase,
    RejectedUpdate,
    RoundRecord,
    SiteRoundStatus,
    SiteState,
    Stage,
)
from fedtrain.messages import UpdateVerdict
from fedtrain.operator.engine import set_condition
from fedtrain.operator.manifests import TrainingRef
from fedtrain.operator.metrics import OperatorMetrics, SiteOutcome, site_outcomes
from fedtrain.operator.settings import OperatorSettings

REF = TrainingRef("research", "wafer", "uid-1")
LABELS = {"namespace": "research", "training": "wafer"}
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def status(
    round_index: int, *sites: tuple[str, SiteState, int], stage: Stage = Stage.TRAINING
) -> FederatedTrainingStatus:
    return FederatedTrainingStatus(
        phase=Phase.RUNNING,
        stage=stage,
        round=round_index,
        round_deadline=NOW + timedelta(minutes=10),
        sites=[SiteRoundStatus(name=name, state=state, attempt=attempt) for name, state, attempt in sites],
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {**LABELS, **labels})


def test_each_ended_attempt_is_counted_once() -> None:
    before = status(1, ("a", SiteState.RUNNING, 0), ("b", SiteState.RUNNING, 0), ("c", SiteState.RUNNING, 0))
    after = status(
        1, ("a", SiteState.ACCEPTED, 0), ("b", SiteState.RUNNING, 1), ("c", SiteState.STRAGGLER, 0)
    )
    assert site_outcomes(before, after) == [
        SiteOutcome("a", "succeeded"),
        SiteOutcome("b", "failed"),  # attempt 0 failed, attempt 1 runs
        SiteOutcome("c", "straggler"),
    ]
    # The same status again (a resync, a restart reading the status back) counts nothing.
    assert site_outcomes(after, after) == []


def test_a_retry_that_fails_at_once_counts_both_attempts() -> None:
    before = status(0, ("b", SiteState.RUNNING, 0))
    after = status(0, ("b", SiteState.FAILED, 1))
    assert site_outcomes(before, after) == [SiteOutcome("b", "failed"), SiteOutcome("b", "failed")]


def test_a_new_round_is_not_compared_with_the_last() -> None:
    before = status(1, ("a", SiteState.ACCEPTED, 0))
    after = status(2, ("a", SiteState.RUNNING, 0))
    assert site_outcomes(before, after) == []


def test_rejections_are_counted_by_reason_and_gauges_follow_the_status() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    before = status(0, ("a", SiteState.TRAINED, 0), ("b", SiteState.TRAINED, 0))
    after = status(0, ("a", SiteState.REJECTED, 0), ("b", SiteState.ACCEPTED, 0))
    verdicts = {"a": UpdateVerdict(round=0, site="a", accepted=False, reason="norm")}
    metrics.status_written(REF, 5, before, after, verdicts)
    metrics.status_written(REF, 5, after, after, verdicts)  # nothing new

    assert value(registry, "fedtrain_updates_rejected_total", reason="norm") == 1
    assert value(registry, "fedtrain_site_jobs_total", site="a", outcome="succeeded") == 1
    assert value(registry, "fedtrain_training_phase", phase="Running") == 1
    assert value(registry, "fedtrain_training_phase", phase="Failed") == 0
    assert value(registry, "fedtrain_training_rounds") == 5
    deadline = value(registry, "fedtrain_training_round_deadline_timestamp_seconds")
    assert deadline == (NOW + timedelta(minutes=10)).timestamp()

    finished = after.model_copy(update={"phase": Phase.SUCCEEDED, "stage": Stage.DONE})
    metrics.status_written(REF, 5, after, finished, verdicts)
    assert value(registry, "fedtrain_training_round_deadline_timestamp_seconds") == 0
    assert value(registry, "fedtrain_training_phase", phase="Succeeded") == 1


def test_a_wait_is_a_gauge_and_a_failure_is_counted_once_by_its_reason() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    running = status(0, ("a", SiteState.RUNNING, 0))
    waiting = running.model_copy(deep=True)
    set_condition(waiting, ConditionType.WAITING, True, "Waiting", "aggregator unreachable", NOW)
    metrics.status_written(REF, 2, running, waiting, {})
    assert value(registry, "fedtrain_training_waiting") == 1
    failed = waiting.model_copy(deep=True)
    failed.phase = Phase.FAILED
    set_condition(failed, ConditionType.WAITING, False, "WaitTimedOut", "gave up", NOW)
    set_condition(failed, ConditionType.FAILED, True, "WaitTimedOut", "gave up", NOW)
    metrics.status_written(REF, 2, waiting, failed, {})
    metrics.status_written(REF, 2, failed, failed, {})  # written again: not a second failure
    assert value(registry, "fedtrain_training_waiting") == 0
    assert value(registry, "fedtrain_training_failures_total", reason="WaitTimedOut") == 1


def test_trainer_figures_and_rounds_then_forget() -> None:
    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    evaluation = EvalMetrics(loss=1.25, accuracy=0.5, macro_f1=0.4, samples=10)
    verdict = UpdateVerdict(
        round=0,
        site="a",
        accepted=True,
        evaluation=evaluation,
        train_seconds=12.5,
        train_metrics={"train_loss": 0.75, "samples_per_second": 320.0},
    )
    metrics.verdict(REF, verdict)
    record = RoundRecord(
        round=0,
        started_at=NOW,
        closed_at=NOW + timedelta(seconds=90),
        participants=["a", "d"],
        evaluation=evaluation,
        bytes_uploaded=4096,
        site_bytes={"a": 3072, "c": 1024},
        failed=["b"],
        rejected=[RejectedUpdate(site="c", reason="norm")],
        left_out=["d"],
        trimmed_share={"a": 0.25, "d": 0.75},
    )
    metrics.round_recorded(REF, record)
    # Robust strategies: a participant krum left out, and the share of values trimmed.
    assert value(registry, "fedtrain_site_round_left_out", site="a") == 0
    assert value(registry, "fedtrain_site_round_left_out", site="d") == 1
    assert value(registry, "fedtrain_site_round_trimmed_share", site="d") == 0.75

    assert value(registry, "fedtrain_site_train_loss", site="a") == 0.75
    assert value(registry, "fedtrain_site_samples_per_second", site="a") == 320.0
    assert value(registry, "fedtrain_site_train_seconds", site="a") == 12.5
    assert value(registry, "fedtrain_site_validation_accuracy", site="a") == 0.5
    assert value(registry, "fedtrain_site_train_accuracy", site="a") is None  # not reported
    assert value(registry, "fedtrain_rounds_completed_total") == 1
    assert value(registry, "fedtrain_round_duration_seconds_sum") == 90
    assert value(registry, "fedtrain_round_update_bytes") == 4096
    # Each site's own upload (a rejected update was uploaded too), 0 for a site that sent none.
    assert value(registry, "fedtrain_site_round_update_bytes", site="a") == 3072
    assert value(registry, "fedtrain_site_round_update_bytes", site="b") == 0
    assert value(registry, "fedtrain_site_round_update_bytes", site="c") == 1024
    assert value(registry, "fedtrain_validation_loss") == 1.25
    assert value(registry, "fedtrain_validation_macro_f1") == 0.4
    assert value(registry, "fedtrain_test_accuracy") is None, "no test split scored yet"
    tested = EvalMetrics(loss=0.5, accuracy=0.875, macro_f1=0.75, samples=16, ece=0.0625)
    final = RoundRecord(
        round=1,
        kind="evaluate",
        started_at=NOW,
        closed_at=NOW,
        test_evaluation=tested,
        site_test_evaluation={"a": tested.model_copy(update={"accuracy": 0.8125})},
    )
    metrics.round_recorded(REF, final)
    assert value(registry, "fedtrain_test_accuracy") == 0.875
    assert value(registry, "fedtrain_test_macro_f1") == 0.75
    assert value(registry, "fedtrain_test_ece") == 0.0625
    assert value(registry, "fedtrain_site_test_accuracy", site="a") == 0.8125

    other = TrainingRef("research", "other", "uid-2")
    metrics.round_recorded(other, record)
    metrics.forget(REF)
    assert value(registry, "fedtrain_site_train_loss", site="a") is None
    assert value(registry, "fedtrain_site_round_update_bytes", site="a") is None
    assert value(registry, "fedtrain_rounds_completed_total") is None
    assert value(registry, "fedtrain_site_test_accuracy", site="a") is None
    assert (
        registry.get_sample_value(
            "fedtrain_rounds_completed_total", {"namespace": "research", "training": "other"}
        )
        == 1
    )


# --------------------------------------------------------------------------------------------------
# the dashboard and the alert rules read only what the running code exports


def exported(exposition: str) -> set[str]:
    """Every metric a /metrics page declares, samples or not, as Prometheus will name its series."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text: str = reply.read().decode()
        return text


def test_every_chart_expression_names_a_metric_the_running_code_exports(
    tmp_path: Path, s3_endpoint: str
) -> None:
    # A running operator (on the API server emulator) ...
    metrics_port = free_port()
    with running_emulator() as emulator:
        settings = OperatorSettings(
            kubeconfig=emulator.write_kubeconfig(tmp_path / "kubeconfig"),
            liveness_port=None,
            metrics_port=metrics_port,
        )
        operator = OperatorThread(settings).start()
        try:
            operator_page = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            operator.stop()

    # ... and a running aggregator service, as its Deployment starts it.
    training = tiny_training("metrics", f"ft-{uuid.uuid4().hex[:12]}", s3_endpoint)
    del training["spec"]["storage"]["credentialsSecret"]
    (tmp_path / "training.yaml").write_text(yaml.safe_dump(training))
    port = free_port()
    env = {
        **os.environ,
        "FEDTRAIN_AGGREGATOR_TRAINING_FILE": str(tmp_path / "training.yaml"),
        "FEDTRAIN_AGGREGATOR_TOKEN": "token",
        "FEDTRAIN_AGGREGATOR_HOST": "127.0.0.1",
        "FEDTRAIN_AGGREGATOR_PORT": str(port),
    }
    with (tmp_path / "aggregator.log").open("wb") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "fedtrain.aggregator", "serve"], env=env, stdout=log, stderr=log
        )
    try:
        aggregator_page = wait_for(
            "the aggregator's /metrics",
            lambda: _try_get(f"http://127.0.0.1:{port}/metrics", service),
            timeout=120,
        )
    finally:
        service.terminate()
        service.wait(30)

    known = exported(operator_page) | exported(aggregator_page)
    assert unknown_metrics(chart_expressions(), known) == set()
    # The contract the dashboard tests check offline is what the code really exports.
    assert known >= CONTRACT_METRICS, CONTRACT_METRICS - known


def _try_get(url: str, process: subprocess.Popen[bytes]) -> str | None:
    if process.poll() is not None:
        raise RuntimeError(f"the aggregator exited with {process.returncode}")
    try:
        return http_get(url)
    except OSError:
        return None
