"""The driver contract: the same scenarios, run by the local runner and by the operator on the
emulator, must leave the same round history.

Each scenario is written once with the history it must produce; the `driver` fixture runs it on both
drivers. Nothing races the machine: no round deadline is reached by waiting (the timeout is an hour;
the straggler scenario moves a clock the drivers read past it once the other sites' updates are in),
and a trainer that must still be running when the test acts is held by contract_trainer.py until the
test lets it go.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from contract_drivers import Attempt, Clock, Driver, Fault, LocalDriver, OperatorDriver, running_cluster
from contract_drivers import created_once as operator_created_once
from operator_harness import wait_for

from fedtrain.dp import epsilon_after

pytestmark = pytest.mark.e2e

ROUND_TIMEOUT = 3600  # reached only when a test moves the clock past it
#: The engine's warnings about sites, which both drivers make known (Kubernetes Events; the CLI's output).
SITE_WARNINGS = {"SiteRetry", "SiteFailed", "Straggler", "UpdateRejected"}


@pytest.fixture(params=["local", "operator"])
def driver(request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str) -> Iterator[Driver]:
    if request.param == "local":
        local = LocalDriver(tmp_path)
        try:
            yield local
        finally:
            local.close()
        return
    with running_cluster(tmp_path, s3_endpoint) as cluster:
        yield OperatorDriver(cluster)


@dataclass(frozen=True)
class Round:
    """One round of the history as both drivers must record it."""

    round: int
    kind: str
    participants: tuple[str, ...]
    stragglers: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()


def rounds(status: dict[str, Any]) -> list[Round]:
    return [
        Round(
            record["round"],
            record["kind"],
            tuple(sorted(record.get("participants") or [])),
            tuple(sorted(record.get("stragglers") or [])),
            tuple(sorted(record.get("failed") or [])),
            tuple(sorted(rejected["site"] for rejected in record.get("rejected") or [])),
        )
        for record in status.get("history") or []
    ]


def training(driver: Driver, name: str, sites: int = 3, **spec: Any) -> dict[str, Any]:
    aggregation = {"minSites": 2, "roundTimeoutSeconds": ROUND_TIMEOUT, **spec.pop("aggregation", {})}
    return driver.training(name, rounds=1, sites=sites, aggregation=aggregation, **spec)


def first_attempts(sites: tuple[str, ...], rounds_run: int) -> set[Attempt]:
    return {(site, index, 0) for site in sites for index in range(rounds_run)}


def check_contract(
    driver: Driver,
    status: dict[str, Any],
    history: list[Round],
    attempts: set[Attempt],
    warnings: AbstractSet[str] = frozenset(),
) -> None:
    """What every scenario asserts, on either driver.

    `attempts`: every (site, round, attempt) whose trainer must have started, each exactly once (an
    attempt is one process, however the driver was stopped or restarted); no other may have started.
    `warnings`: the site warnings the driver must have made known, and no others.
    """
    assert status.get("phase") == "Succeeded", status.get("message")
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    assert conditions.get("Succeeded") == "True", conditions
    assert conditions.get("Progressing") == "False", conditions
    assert rounds(status) == history
    assert driver.warnings() & SITE_WARNINGS == warnings

    starts = driver.trainers.starts()
    assert [s for s in starts if s.overlap] == [], "two processes of one attempt ran at the same time"
    assert Counter(start.attempt_key for start in starts) == Counter(attempts)
    created = driver.attempts_created()
    assert sorted(created) == sorted(attempts), "one Job / job file for each attempt started, none twice"
    if isinstance(driver, OperatorDriver):
        operator_created_once(driver.cluster)
    wait_for("no trainer left running", lambda: not driver.trainers_running(), timeout=30)


def site_states(status: dict[str, Any]) -> dict[str, str]:
    return {site["name"]: site.get("state", "") for site in status.get("sites") or []}


# --------------------------------------------------------------------------------------------------


def test_every_site_outcome_in_one_round_success_failure_rejection_and_straggler(driver: Driver) -> None:
    """One round holds every way a site can end, and the training still succeeds: fab-a is accepted,
    fab-b's update is corrupted and rejected, fab-c fails every attempt (and is retried once), fab-d
    hangs until the clock passes the round's deadline. The evaluation round scores everyone left.
    Also privacy.dp in both drivers: the trainers clip, the aggregator noises, the status shows epsilon;
    and a test split with cross-site validation."""
    sites = ("fab-a", "fab-b", "fab-c", "fab-d")
    clock = Clock()
    faults = [
        Fault("corrupt", site="fab-b", round=0, mode="train"),
        Fault("fail", site="fab-c"),
        Fault("hang", site="fab-d", round=0),
    ]
    document = training(
        driver,
        "contract-outcomes",
        sites=4,
        aggregation={"minSites": 1, "siteRetries": 1, "weighting": "uniform"},
        privacy={"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.0}},
        evaluation={"testFraction": 0.25, "crossSite": True},
    )
    driver.start(document, faults=faults, clock=clock)

    def all_but_fab_d_done() -> bool:
        states = site_states(driver.status())
        done = {"fab-a": "Accepted", "fab-b": "Rejected", "fab-c": "Failed", "fab-d": "Running"}
        return "fab-d" in driver.trainers.started(0) and all(states.get(s) == v for s, v in done.items())

    wait_for("every site but fab-d done, fab-d hanging", all_but_fab_d_done, timeout=480)
    assert driver.status()["round"] == 0
    assert not driver.status().get("history"), "the round waits for fab-d until its deadline"
    clock.advance(ROUND_TIMEOUT + 60)
    status = driver.wait_finished()
    check_contract(
        driver,
        status,
        [
            Round(0, "train", ("fab-a",), stragglers=("fab-d",), failed=("fab-c",), rejected=("fab-b",)),
            Round(1, "evaluate", ("fab-a", "fab-b", "fab-d"), failed=("fab-c",)),
        ],
        # siteRetries: 1, in the training round and in the evaluation
        first_attempts(sites, 2) | {("fab-c", 0, 1), ("fab-c", 1, 1)},
        warnings={"SiteRetry", "SiteFailed", "UpdateRejected", "Straggler"},
    )
    epsilon = epsilon_after(1, noise_multiplier=1.0, sampling_rate=1.0, delta=1e-5)
    assert status["privacyEpsilon"] == pytest.approx(epsilon)
    assert status["history"][0]["epsilon"] == pytest.approx(epsilon)
    (rejected,) = status["history"][0]["rejected"]
    assert "checksum" in rejected["reason"], rejected
    # evaluation.crossSite: only fab-a's update made round 0, so only fab-a has a local model; the
    # three sites that reported scored it and the final global model on their test splits.
    reporting = {"fab-a", "fab-b", "fab-d"}
    assert set(status["crossSiteAccuracy"]) == {"fab-a", "(global)"}
    assert all(set(column) == reporting for column in status["crossSiteAccuracy"].values())
    assert set(status["history"][-1]["crossSite"]["fab-a"]) == reporting
    assert status["testEvaluation"]["samples"] == 3 * 10, "40 maps a site, a quarter held out"


def test_a_killed_driver_and_a_suspension_each_stop_a_round_that_then_goes_on(driver: Driver) -> None:
    """Two interruptions of one training, each in its round. Round 0: the driver is killed with the
    trainers surely at work (they wait at the gate) and started again: it carries on without
    repeating an attempt. Round 1, the final evaluation: its first attempts never finish on their
    own; the training is suspended (the driver stops them) and resumed, and each site starts the
    round again as attempt 1. Also a robust strategy in both drivers: trimmedMean combines round 0
    from the store. And storage.retention: round 0's updates deleted once it closed, one global model
    kept besides the best, and the resumed training still merges the best and the final models."""
    sites = ("fab-a", "fab-b")
    robust = {"strategy": "trimmedMean", "robust": {"trimFraction": 0.25}}
    retention = {"retention": {"deleteUpdates": True, "keepGlobalModels": 1}}
    document = training(driver, "contract-stops", sites=2, aggregation=robust, storage=retention)
    driver.start(document, faults=[Fault("hold", round=0), Fault("hang", round=1, attempt=0)])
    wait_for("round 0's trainers", lambda: driver.trainers.started(0) == set(sites), timeout=240)
    driver.restart()
    driver.trainers.open_gate()

    def evaluation_running() -> bool:
        status = driver.status()
        states = site_states(status)
        return (
            status.get("round") == 1
            and driver.trainers.started(1) == set(sites)
            and all(states.get(s) == "Running" for s in sites)
        )

    wait_for("round 1's trainers running", evaluation_running, timeout=240)
    suspended = driver.suspend()
    assert suspended["phase"] == "Suspended"
    assert {c["type"]: c["status"] for c in suspended["conditions"]}["Suspended"] == "True"
    assert suspended["round"] == 1
    driver.resume()
    status = driver.wait_finished()
    check_contract(
        driver,
        status,
        [Round(0, "train", sites), Round(1, "evaluate", sites)],
        # Round 0's attempts ran once across the restart; the suspended ones were not resumed.
        first_attempts(sites, 2) | {("fab-a", 1, 1), ("fab-b", 1, 1)},
    )
    # Two sites, a quarter trimmed per side: floor(0.5) = 0 values trimmed of either.
    assert status["history"][0]["trimmedShare"] == {"fab-a": 0.0, "fab-b": 0.0}
    store, layout = driver.store()
    assert not any(store.exists(layout.update(0, site)) for site in sites), "round 0's updates deleted"
    assert all(store.exists(layout.update(1, site)) for site in sites), "evaluation reports are kept"
    kept = {model for model in (0, 1) if store.exists(layout.global_model(model))}
    assert kept == {1, status["bestRound"]}, "the newest global model and the best one"
    assert store.exists(layout.manifest(0))
    assert status["bestMergedModelUri"].endswith("final/model-best-merged.safetensors")
    assert store.exists(layout.best_merged_model())
