"""The round engine, transition by transition: pure calls of `step`, no processes, no models.

Most tests drive the engine through `World`, which plays a driver: it turns what the test sets (Job
states keyed (site, attempt), the aggregator's verdicts, manifests) into `Observations`, calls `step`
at a clock the test moves, persists the status, and optionally carries out the actions the way a
well-behaved driver would (`react=True`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, TypeVar

import pytest

from fedtrain.api import (
    STATUS_HISTORY_LIMIT,
    AttemptRef,
    Condition,
    ConditionType,
    EvalMetrics,
    ExchangePolicy,
    ExchangeSpec,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    Phase,
    RejectedUpdate,
    RoundRecord,
    SiteState,
    Stage,
)
from fedtrain.evaluation import pool
from fedtrain.messages import ModelReply, Participant, RoundManifest, UpdateVerdict
from fedtrain.operator.core import RoundMemory
from fedtrain.operator.engine import (
    Action,
    ApplyRetention,
    CloseRound,
    Decision,
    Event,
    Failure,
    InitializeModel,
    JobMode,
    JobObservation,
    JobState,
    MergeFinalModel,
    Observations,
    RecordRound,
    ReleaseAggregator,
    StartSiteJob,
    StopSiteJob,
    SubmitUpdate,
    select_sites,
    set_condition,
    step,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 600
TICK = timedelta(seconds=1)
MERGED_URI = "s3://models/fedtrain/default/demo/final/model-merged.safetensors"
BEST_MERGED_URI = "s3://models/fedtrain/default/demo/final/model-best-merged.safetensors"

ACTIVE = JobObservation(JobState.ACTIVE)
SUCCEEDED = JobObservation(JobState.SUCCEEDED)

PROGRESSING = ConditionType.PROGRESSING
READY = ConditionType.READY
SUSPENDED = ConditionType.SUSPENDED

ActionT = TypeVar("ActionT")


# --------------------------------------------------------------------------------------------------
# building inputs


def seconds(count: float) -> timedelta:
    return timedelta(seconds=count)


def names(count: int) -> list[str]:
    return [f"site-{index}" for index in range(count)]


def global_uri(round_index: int) -> str:
    return f"s3://models/fedtrain/default/demo/rounds/{round_index:04d}/global.safetensors"


def make_spec(
    sites: int = 3,
    *,
    rounds: int = 3,
    min_sites: int = 2,
    retries: int = 1,
    site_fraction: float = 1.0,
    seed: int = 0,
    evaluation: dict[str, Any] | None = None,
    suspend: bool = False,
) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "training": {"rounds": rounds, "seed": seed},
            "aggregation": {
                "minSites": min_sites,
                "roundTimeoutSeconds": TIMEOUT,
                "siteRetries": retries,
                "siteFraction": site_fraction,
            },
            "evaluation": evaluation or {},
            "sites": [{"name": name, "data": {"synthetic": {}}} for name in names(sites)],
            "suspend": suspend,
        }
    )


def with_suspend(spec: FederatedTrainingSpec, suspend: bool) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate({**spec.to_api(), "suspend": suspend})


def metrics(
    accuracy: float, loss: float = 1.0, macro_f1: float | None = None, samples: int = 100
) -> EvalMetrics:
    return EvalMetrics(
        accuracy=accuracy,
        loss=loss,
        macro_f1=accuracy if macro_f1 is None else macro_f1,
        samples=samples,
    )


def verdict(
    site: str,
    round_index: int,
    *,
    accepted: bool = True,
    reason: str | None = None,
    message: str | None = None,
    samples: int = 500,
    evaluation: EvalMetrics | None = None,
    update_bytes: int = 1000,
    train_seconds: float | None = 2.5,
) -> UpdateVerdict:
    return UpdateVerdict(
        round=round_index,
        site=site,
        accepted=accepted,
        reason=reason,
        message=message,
        samples=samples,
        evaluation=evaluation,
        update_bytes=update_bytes,
        train_seconds=train_seconds,
    )


def manifest(
    round_index: int, participants: Sequence[str], rejected: Sequence[RejectedUpdate] = ()
) -> RoundManifest:
    return RoundManifest(
        training="demo",
        round=round_index,
        strategy="fedavg",
        weighting="samples",
        participants=[
            Participant(site=site, weight=1 / len(participants), samples=500, sha256="a" * 64, norm=1.0)
            for site in participants
        ],
        rejected=list(rejected),
        model_key=f"rounds/{round_index + 1:04d}/global.safetensors",
        model_uri=global_uri(round_index + 1),
        model_sha256="b" * 64,
        closed_at=T0,
    )


def persisted(status: FederatedTrainingStatus) -> FederatedTrainingStatus:
    """The status as a driver reads it back from its file or from the CR (camelCase JSON, no nulls)."""
    return FederatedTrainingStatus.model_validate_json(
        status.model_dump_json(by_alias=True, exclude_none=True)
    )


# --------------------------------------------------------------------------------------------------
# reading outputs


def condition(status: FederatedTrainingStatus, kind: ConditionType) -> Condition:
    found = [item for item in status.conditions if item.type is kind]
    assert len(found) == 1, f"{kind} appears {len(found)} times in {status.conditions}"
    return found[0]


def states(status: FederatedTrainingStatus) -> dict[str, SiteState]:
    return {site.name: site.state for site in status.sites}


def of_type(actions: Iterable[Action], kind: type[ActionT]) -> list[ActionT]:
    return [action for action in actions if isinstance(action, kind)]


def starts(
    round_index: int,
    sites: Iterable[str],
    attempt: int = 0,
    mode: JobMode = "train",
    state_from: Mapping[str, AttemptRef] | None = None,
) -> list[Action]:
    return [
        StartSiteJob(
            site=site, round=round_index, attempt=attempt, mode=mode, state_from=(state_from or {}).get(site)
        )
        for site in sites
    ]


# --------------------------------------------------------------------------------------------------
# the fake driver


Score = Callable[[int, str], EvalMetrics | None]


def improving_score(round_index: int, site: str) -> EvalMetrics:
    return metrics(accuracy=0.5 + 0.01 * round_index, loss=1.0 - 0.01 * round_index)


@dataclass
class Step:
    now: datetime
    before: FederatedTrainingStatus
    decision: Decision


@dataclass
class World:
    """A driver's world: observations the test sets (or the world derives from actions), and a clock.

    Observations are about the current round only, as the engine requires: when the status moves to
    another round the world forgets the Jobs and verdicts it saw, as a driver scoping them by round does.
    """

    spec: FederatedTrainingSpec
    status: FederatedTrainingStatus = field(default_factory=FederatedTrainingStatus)
    now: datetime = T0
    react: bool = False
    # how the world answers when it reacts
    score: Score = improving_score
    rejections: dict[tuple[int, str], str] = field(default_factory=dict)  # (round, site) -> reason
    failures: dict[tuple[int, str, int], str] = field(default_factory=dict)  # (round, site, attempt)
    hanging: set[tuple[int, str]] = field(default_factory=set)  # (round, site): never finishes
    # what the engine observes: the Jobs, and the drivers' own per-round memory of what actions answered
    jobs: dict[tuple[str, int], JobObservation] = field(default_factory=dict)
    memory: RoundMemory = field(default_factory=RoundMemory)
    # what happened
    trace: list[Step] = field(default_factory=list)

    def observations(self) -> Observations:
        return self.memory.observations(self.status, self.jobs)

    # The memory's fields, under the names the tests set them by.
    @property
    def verdicts(self) -> dict[str, UpdateVerdict]:
        if self.memory.round != self.status.round:  # as a driver's memory moves on with the round
            self.memory.round, self.memory.verdicts = self.status.round, {}
        return self.memory.verdicts

    @verdicts.setter
    def verdicts(self, value: dict[str, UpdateVerdict]) -> None:
        self.memory.round = self.status.round
        self.memory.verdicts = value

    @property
    def manifest(self) -> RoundManifest | None:
        return self.memory.manifest

    @manifest.setter
    def manifest(self, value: RoundManifest | None) -> None:
        self.memory.manifest = value

    @property
    def initial_model_uri(self) -> str | None:
        return self.memory.initial_model_uri

    @initial_model_uri.setter
    def initial_model_uri(self, value: str | None) -> None:
        self.memory.initial_model_uri = value

    @property
    def merged_model_uri(self) -> str | None:
        return self.memory.merged.model_uri if self.memory.merged else None

    @merged_model_uri.setter
    def merged_model_uri(self, value: str | None) -> None:
        best = BEST_MERGED_URI if self.status.best_round is not None else None
        self.memory.merged = ModelReply(model_uri=value, best_model_uri=best) if value else None

    def step(self) -> Decision:
        before = self.status
        frozen = before.model_dump(mode="json")
        decision = step(self.spec, before, self.observations(), self.now)
        assert before.model_dump(mode="json") == frozen, "step mutated its input status"
        assert decision.status is not before
        if decision.status.round != before.round:
            self.jobs.clear()
        self.status = persisted(decision.status)
        assert self.status == decision.status, "the status does not survive being persisted"
        self.trace.append(Step(self.now, before, decision))
        if self.react:
            for action in decision.actions:
                self.execute(action)
        return decision

    def execute(self, action: Action) -> None:
        match action:
            case InitializeModel():
                self.initial_model_uri = global_uri(0)
            case StartSiteJob(site=site, attempt=attempt):
                self.jobs[(site, attempt)] = ACTIVE
            case StopSiteJob(site=site, attempt=attempt, reason=reason):
                self.jobs[(site, attempt)] = JobObservation(JobState.FAILED, f"stopped: {reason}")
            case SubmitUpdate(site=site, round=round_index):
                reason = self.rejections.get((round_index, site))
                self.verdicts[site] = verdict(
                    site,
                    round_index,
                    accepted=reason is None,
                    reason=reason,
                    message=None if reason is None else "refused by the aggregator",
                    evaluation=self.score(round_index, site),
                )
            case CloseRound(round=round_index, participants=participants, rejected=rejected):
                self.manifest = manifest(round_index, participants, rejected)
            case MergeFinalModel():
                self.merged_model_uri = MERGED_URI
            case RecordRound() | ApplyRetention():
                pass

    def finish_jobs(self) -> None:
        """Jobs the engine has seen running finish, as the plan says."""
        round_index = self.status.round
        for site in self.status.sites:
            key = (site.name, site.attempt)
            if site.state is not SiteState.RUNNING or self.jobs.get(key) != ACTIVE:
                continue
            if (round_index, site.name) in self.hanging:
                continue
            failure = self.failures.get((round_index, site.name, site.attempt))
            self.jobs[key] = SUCCEEDED if failure is None else JobObservation(JobState.FAILED, failure)

    def run(self, max_steps: int = 2000) -> FederatedTrainingStatus:
        """Step until the training finishes; when nothing moves, time jumps to the round deadline."""
        for _ in range(max_steps):
            before = self.status
            decision = self.step()
            if self.status.phase.finished:
                return self.status
            if decision.actions or self.status != before:
                self.finish_jobs()
                self.now += TICK
                continue
            deadline = self.status.round_deadline
            if deadline is None or deadline <= self.now:
                raise AssertionError(
                    f"stuck in {self.status.phase} {self.status.stage}: {self.status.message}"
                )
            self.now = deadline
        raise AssertionError(f"not finished after {max_steps} steps")

    # reading what happened

    @property
    def actions(self) -> list[Action]:
        return [action for entry in self.trace for action in entry.decision.actions]

    @property
    def events(self) -> list[Event]:
        return [event for entry in self.trace for event in entry.decision.events]


def start_round_zero(spec: FederatedTrainingSpec) -> World:
    """A world whose training has just started round 0 (the jobs not seen yet)."""
    world = World(spec)
    world.initial_model_uri = global_uri(0)
    world.step()
    assert world.status.stage is Stage.TRAINING
    assert world.status.round == 0
    return world


def complete(
    world: World,
    sites: Iterable[str],
    *,
    accepted: bool = True,
    evaluation: EvalMetrics | None = None,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    """The sites' current jobs succeeded and the aggregator has answered their submissions."""
    for name in sites:
        attempt = world.status.site(name).attempt
        world.jobs[(name, attempt)] = SUCCEEDED
        world.verdicts[name] = verdict(
            name,
            world.status.round,
            accepted=accepted,
            reason=reason,
            message=message,
            evaluation=evaluation or metrics(0.5),
        )


def assert_transition_times_honest(world: World) -> None:
    """Every condition's lastTransitionTime moved exactly when its status changed."""
    for entry in world.trace:
        previous = {item.type: item for item in entry.before.conditions}
        for item in entry.decision.status.conditions:
            old = previous.get(item.type)
            if old is None or old.status != item.status:
                assert item.last_transition_time == entry.now, (item, entry.now)
            else:
                assert item.last_transition_time == old.last_transition_time, (item, old)


# --------------------------------------------------------------------------------------------------
# pure helpers


def test_figures_without_counts_are_weighted_by_validation_samples() -> None:
    combined = pool(
        {"a": metrics(0.5, loss=1.0, macro_f1=0.4, samples=100), "b": metrics(0.9, 0.2, 0.8, 300)}
    )
    assert combined is not None
    assert combined.samples == 400
    assert combined.accuracy == pytest.approx(0.8)
    assert combined.loss == pytest.approx(0.4)
    assert combined.macro_f1 == pytest.approx(0.7)
    assert combined.pooled is False
    assert pool({}) is None
    assert pool({"a": metrics(0.5, samples=0)}) is None


def test_set_condition_moves_transition_time_only_on_a_status_change() -> None:
    status = FederatedTrainingStatus()
    set_condition(status, PROGRESSING, True, "Initializing", "first", T0)
    set_condition(status, PROGRESSING, True, "RoundRunning", "second", T0 + seconds(10))
    kept = condition(status, PROGRESSING)
    assert (kept.reason, kept.message, kept.last_transition_time) == ("RoundRunning", "second", T0)
    set_condition(status, PROGRESSING, False, "Completed", "done", T0 + seconds(20))
    flipped = condition(status, PROGRESSING)
    assert (flipped.status, flipped.last_transition_time) == ("False", T0 + seconds(20))
    assert len(status.conditions) == 1


def test_select_sites_is_seeded_and_keeps_at_least_min_sites() -> None:
    spec = make_spec(sites=6, site_fraction=0.5, min_sites=2)
    picks = [select_sites(spec, round_index) for round_index in range(20)]
    random.seed(1234)  # the selection must not depend on the global random state
    random.random()
    assert picks == [select_sites(spec, round_index) for round_index in range(20)]
    assert picks == [select_sites(make_spec(sites=6, site_fraction=0.5), r) for r in range(20)]
    assert all(len(pick) == 3 for pick in picks)  # ceil(0.5 * 6)
    assert all(pick == [name for name in names(6) if name in pick] for pick in picks)  # spec order
    assert len({tuple(pick) for pick in picks}) > 1  # rounds differ, at least sometimes
    other_seed = make_spec(sites=6, site_fraction=0.5, seed=7)
    assert [select_sites(other_seed, r) for r in range(20)] != picks

    few = make_spec(sites=6, site_fraction=0.1, min_sites=2)  # ceil(0.6) = 1 < minSites
    assert all(len(select_sites(few, r)) == 2 for r in range(20))
    assert select_sites(make_spec(sites=6), 3) == names(6)


# --------------------------------------------------------------------------------------------------
# start


def test_pending_training_asks_for_the_initial_model() -> None:
    spec = make_spec()
    status = FederatedTrainingStatus()
    decision = step(spec, status, Observations(), T0)

    assert decision.actions == [InitializeModel()]
    assert decision.events == []
    current = decision.status
    assert (current.phase, current.stage, current.round) == (Phase.RUNNING, Stage.INITIALIZING, 0)
    assert current.started_at == T0
    assert current.sites == []
    assert current.global_model_uri is None
    assert current.message == "writing the initial global model"
    progressing = condition(current, PROGRESSING)
    assert (progressing.status, progressing.reason, progressing.last_transition_time) == (
        "True",
        "Initializing",
        T0,
    )
    assert condition(current, READY).status == "True"
    assert status == FederatedTrainingStatus()

    later = step(spec, current, Observations(), T0 + seconds(5))
    assert later.actions == [InitializeModel()]
    assert later.status.started_at == T0
    assert later.status == current


def test_initial_model_starts_round_zero_on_every_site() -> None:
    spec = make_spec()
    initializing = step(spec, FederatedTrainingStatus(), Observations(), T0).status
    now = T0 + seconds(30)
    decision = step(spec, initializing, Observations(initial_model_uri=global_uri(0)), now)

    assert decision.actions == starts(0, names(3))
    current = decision.status
    assert (current.phase, current.stage, current.round) == (Phase.RUNNING, Stage.TRAINING, 0)
    assert current.global_model_uri == global_uri(0)
    assert current.round_started_at == now
    assert current.round_deadline == now + seconds(TIMEOUT)
    assert [(site.name, site.state, site.attempt, site.started_at) for site in current.sites] == [
        (name, SiteState.PENDING, 0, now) for name in names(3)
    ]
    assert current.message == "round 1 of 3: 3 sites training"
    assert decision.events == [
        Event("Normal", "RoundStarted", "round 0 started with sites site-0, site-1, site-2")
    ]
    progressing = condition(current, PROGRESSING)
    # Progressing was already True (Initializing): the reason moves on, the transition time does not.
    assert (progressing.status, progressing.reason, progressing.last_transition_time) == (
        "True",
        "RoundRunning",
        T0,
    )


def test_initial_model_seen_on_the_very_first_step_starts_round_zero_at_once() -> None:
    decision = step(make_spec(), FederatedTrainingStatus(), Observations(initial_model_uri=global_uri(0)), T0)
    assert decision.actions == starts(0, names(3))
    assert decision.status.started_at == T0
    assert decision.status.stage is Stage.TRAINING


# --------------------------------------------------------------------------------------------------
# sites in a round


def test_sites_follow_their_jobs_and_the_aggregator_verdicts() -> None:
    world = start_round_zero(make_spec())
    world.jobs = {(name, 0): ACTIVE for name in names(3)}
    decision = world.step()
    assert decision.actions == []
    assert decision.events == []
    assert set(states(world.status).values()) == {SiteState.RUNNING}

    world.jobs[("site-0", 0)] = SUCCEEDED
    world.jobs[("site-1", 0)] = SUCCEEDED
    decision = world.step()
    assert decision.actions == [SubmitUpdate(site="site-0", round=0), SubmitUpdate(site="site-1", round=0)]
    assert states(world.status) == {
        "site-0": SiteState.TRAINED,
        "site-1": SiteState.TRAINED,
        "site-2": SiteState.RUNNING,
    }
    # No verdict yet: the (idempotent) submission is asked for again.
    assert world.step().actions == decision.actions

    world.now = T0 + seconds(40)
    good = metrics(0.75, loss=0.6, samples=120)
    world.verdicts["site-0"] = verdict(
        "site-0", 0, samples=480, evaluation=good, update_bytes=4096, train_seconds=12.5
    )
    world.verdicts["site-1"] = verdict(
        "site-1", 0, accepted=False, reason="norm", message="update norm 52.0 exceeds 10.0", evaluation=good
    )
    decision = world.step()

    assert decision.actions == []
    accepted = world.status.site("site-0")
    assert accepted.state is SiteState.ACCEPTED
    assert (accepted.samples, accepted.evaluation, accepted.update_bytes, accepted.train_seconds) == (
        480,
        good,
        4096,
        12.5,
    )
    assert accepted.finished_at == world.now
    assert accepted.message is None
    rejected = world.status.site("site-1")
    assert rejected.state is SiteState.REJECTED
    assert rejected.message == "norm: update norm 52.0 exceeds 10.0"
    assert rejected.finished_at == world.now
    assert decision.events == [
        Event("Warning", "UpdateRejected", "round 0: site site-1: norm: update norm 52.0 exceeds 10.0")
    ]
    assert world.status.site("site-2").state is SiteState.RUNNING
    assert world.status.stage is Stage.TRAINING


def test_a_verdict_seen_with_the_finished_job_accepts_the_site_at_once() -> None:
    world = start_round_zero(make_spec())
    complete(world, ["site-0"])
    decision = world.step()
    assert of_type(decision.actions, SubmitUpdate) == []
    assert world.status.site("site-0").state is SiteState.ACCEPTED


def test_a_verdict_of_another_round_is_not_taken_for_this_one() -> None:
    world = start_round_zero(make_spec())
    world.jobs[("site-0", 0)] = SUCCEEDED
    world.verdicts["site-0"] = verdict("site-0", 3, accepted=False, reason="norm")
    decision = world.step()
    assert SubmitUpdate(site="site-0", round=0) in decision.actions
    assert world.status.site("site-0").state is SiteState.TRAINED
    assert decision.events == []


def test_a_rejection_without_a_message_keeps_its_reason() -> None:
    world = start_round_zero(make_spec())
    complete(world, ["site-0"], accepted=False, reason="checksum")
    decision = world.step()
    assert world.status.site("site-0").message == "checksum"
    assert decision.events == [Event("Warning", "UpdateRejected", "round 0: site site-0: checksum")]


# --------------------------------------------------------------------------------------------------
# closing a round


def test_round_closes_records_the_weighted_evaluation_and_starts_the_next() -> None:
    world = start_round_zero(make_spec())
    evaluations = {
        "site-0": metrics(0.5, loss=1.0, macro_f1=0.4, samples=100),
        "site-1": metrics(0.8, loss=0.5, macro_f1=0.7, samples=300),
        "site-2": metrics(0.2, loss=2.0, macro_f1=0.1, samples=100),
    }
    world.jobs = {(name, 0): SUCCEEDED for name in names(3)}
    world.verdicts = {
        "site-0": verdict("site-0", 0, samples=400, evaluation=evaluations["site-0"], update_bytes=1000),
        "site-1": verdict("site-1", 0, samples=600, evaluation=evaluations["site-1"], update_bytes=2000),
        "site-2": verdict(
            "site-2",
            0,
            accepted=False,
            reason="norm",
            message="too large",
            evaluation=evaluations["site-2"],
            update_bytes=3000,
        ),
    }
    world.now = T0 + seconds(60)
    decision = world.step()

    close = CloseRound(
        round=0,
        participants=("site-0", "site-1"),
        rejected=(RejectedUpdate(site="site-2", reason="norm: too large"),),
    )
    assert decision.actions == [close]
    assert world.status.stage is Stage.CLOSING
    assert world.status.message == "closing round 0 with 2 updates"
    assert world.status.history == []

    # Until the manifest of this round is seen, the (idempotent) close is asked for again.
    assert world.step().actions == [close]
    world.manifest = manifest(7, ["site-0"])
    assert world.step().actions == [close]
    assert world.status.stage is Stage.CLOSING

    world.manifest = manifest(
        0, ["site-0", "site-1"], [RejectedUpdate(site="site-2", reason="norm: too large")]
    ).model_copy(update={"not_selected": ["site-1"], "trimmed_share": {"site-0": 0.1, "site-1": 0.9}})
    closed_at = T0 + seconds(90)
    world.now = closed_at
    decision = world.step()

    assert len(world.status.history) == 1
    record = world.status.history[0]
    assert (record.round, record.kind, record.started_at, record.closed_at) == (0, "train", T0, closed_at)
    assert record.participants == ["site-0", "site-1"]
    assert record.rejected == [RejectedUpdate(site="site-2", reason="norm: too large")]
    # What a robust strategy made of the updates, as the manifest says.
    assert (record.left_out, record.trimmed_share) == (["site-1"], {"site-0": 0.1, "site-1": 0.9})
    assert record.stragglers == []
    assert record.failed == []
    assert record.site_evaluation == evaluations  # a rejected site still scored the global model
    assert record.evaluation is not None
    assert record.evaluation.samples == 500
    assert record.evaluation.accuracy == pytest.approx((0.5 * 100 + 0.8 * 300 + 0.2 * 100) / 500)  # 0.62
    assert record.evaluation.loss == pytest.approx((1.0 * 100 + 0.5 * 300 + 2.0 * 100) / 500)  # 0.9
    assert record.evaluation.macro_f1 == pytest.approx((0.4 * 100 + 0.7 * 300 + 0.1 * 100) / 500)  # 0.52
    assert record.bytes_uploaded == 6000
    assert record.model_uri == global_uri(1)
    assert record.duration_seconds == 90

    # Accepted sites start from the state their accepted attempt wrote; the rejected one's is not used.
    committed = {"site-0": AttemptRef(round=0, attempt=0), "site-1": AttemptRef(round=0, attempt=0)}
    assert decision.status.site_states == committed
    assert decision.actions == [RecordRound(record=record), *starts(1, names(3), state_from=committed)]
    current = world.status
    assert (current.round, current.stage, current.phase) == (1, Stage.TRAINING, Phase.RUNNING)
    assert current.global_model_uri == global_uri(1)
    assert current.round_started_at == closed_at
    assert current.round_deadline == closed_at + seconds(TIMEOUT)
    assert [(site.state, site.attempt, site.samples) for site in current.sites] == [
        (SiteState.PENDING, 0, None)
    ] * 3
    # Round 0's evaluation describes global model 0, the one its sites received.
    assert (current.best_round, current.best_model_uri) == (0, global_uri(0))
    assert current.best_metric == pytest.approx(0.62)
    assert current.rounds_without_improvement == 0
    assert decision.events == [
        Event("Normal", "RoundClosed", "round 0 closed with 2 updates; global model 0 accuracy 0.620"),
        Event("Normal", "RoundStarted", "round 1 started with sites site-0, site-1, site-2"),
    ]


def test_an_evaluation_starts_from_the_committed_state_where_sites_keep_personal_tensors() -> None:
    personal = ExchangeSpec(policy=ExchangePolicy.EXCLUDE, layers=["head.*"])
    world = start_round_zero(make_spec(rounds=1).model_copy(update={"exchange": personal}))
    complete(world, names(3), evaluation=metrics(0.5, samples=100))
    world.step()
    world.manifest = manifest(0, names(3))
    world.now = T0 + seconds(100)
    decision = world.step()
    committed = {name: AttemptRef(round=0, attempt=0) for name in names(3)}
    assert of_type(decision.actions, StartSiteJob) == starts(
        1, names(3), mode="evaluate", state_from=committed
    )


def test_the_final_evaluation_records_each_site_s_own_merged_model() -> None:
    personal = ExchangeSpec(policy=ExchangePolicy.EXCLUDE, layers=["head.*"], site_models=True)
    world = start_round_zero(make_spec(rounds=1).model_copy(update={"exchange": personal}))
    complete(world, names(3))
    world.step()
    world.manifest = manifest(0, names(3))
    world.step()
    assert world.status.stage is Stage.EVALUATING
    assert world.status.site_model_uris == {}, "a training round publishes no site model"
    complete(world, names(3))
    own = {name: f"s3://bucket/sites/{name}/model-merged.safetensors" for name in names(2)}
    for name, uri in own.items():  # the third site's report came without one (a spec without it)
        world.verdicts[name] = world.verdicts[name].model_copy(update={"site_model_uri": uri})
    world.step()
    assert world.status.stage is Stage.FINALIZING
    assert world.status.site_model_uris == own
    world.merged_model_uri = MERGED_URI
    world.step()
    assert world.status.phase is Phase.SUCCEEDED
    assert world.status.site_model_uris == own


def test_the_best_round_follows_validation_alone_and_the_test_figures_reach_the_status() -> None:
    """Round 0's model scores best on validation; the final model's test figures, however good, never
    move the best round: the merge asks for round 0 as the best, and the status shows the test figures."""
    world = start_round_zero(make_spec(rounds=1))
    complete(world, names(3), evaluation=metrics(0.9, samples=100))
    world.step()
    world.manifest = manifest(0, names(3))
    world.step()
    world.jobs = {(name, 0): ACTIVE for name in names(3)}
    world.step()
    complete(world, names(3), evaluation=metrics(0.5, samples=100))
    for index, name in enumerate(names(3)):
        tested = metrics(0.99 - index * 0.01, samples=50 + index)
        world.verdicts[name] = world.verdicts[name].model_copy(update={"test_evaluation": tested})
    decision = world.step()

    assert (world.status.best_round, world.status.best_metric) == (0, pytest.approx(0.9))
    assert of_type(decision.actions, MergeFinalModel) == [MergeFinalModel(round=1, best_round=0)]
    record = world.status.history[-1]
    assert set(record.site_test_evaluation) == set(names(3))
    assert world.status.test_evaluation == record.test_evaluation
    assert world.status.test_evaluation is not None
    assert world.status.test_evaluation.samples == 153
    expected = sum((0.99 - i * 0.01) * (50 + i) for i in range(3)) / 153
    assert world.status.test_evaluation.accuracy == pytest.approx(expected)


def test_retention_asks_for_each_closed_rounds_uploads_and_the_models_that_left_the_window() -> None:
    spec = FederatedTrainingSpec.model_validate(
        {
            **make_spec(rounds=4).to_api(),
            "storage": {"retention": {"deleteUpdates": True, "keepGlobalModels": 1}},
        }
    )
    world = World(spec, react=True, score=scores(accuracy={1: 0.9}))
    status = world.run()

    assert status.best_round == 1
    # Model 0 leaves the window at round 0's close unless it is the best (it is, until round 1's);
    # model 1, the best from then on, stays; 2 and 3 leave as newer ones come.
    assert of_type(world.actions, ApplyRetention) == [
        ApplyRetention(round=0, updates=True, models=()),
        ApplyRetention(round=1, updates=True, models=(0,)),
        ApplyRetention(round=2, updates=True, models=(2,)),
        ApplyRetention(round=3, updates=True, models=(3,)),
    ]
    assert of_type(world.actions, MergeFinalModel) == [MergeFinalModel(round=4, best_round=1)]


def test_last_round_is_followed_by_evaluation_merge_and_success() -> None:
    world = start_round_zero(make_spec(rounds=1))
    complete(world, names(3), evaluation=metrics(0.5, samples=100))
    assert world.step().actions == [CloseRound(round=0, participants=tuple(names(3)), rejected=())]
    world.manifest = manifest(0, names(3))
    world.now = T0 + seconds(100)
    decision = world.step()

    assert of_type(decision.actions, StartSiteJob) == starts(1, names(3), mode="evaluate")
    assert (world.status.stage, world.status.round) == (Stage.EVALUATING, 1)
    assert world.status.global_model_uri == global_uri(1)
    assert world.status.round_deadline == world.now + seconds(TIMEOUT)
    assert world.status.message == "evaluating the final model on 3 sites"
    assert decision.events[-1] == Event(
        "Normal", "EvaluationStarted", "evaluating the final model on 3 sites"
    )
    assert [event.reason for event in decision.events] == ["RoundClosed", "EvaluationStarted"]

    world.jobs = {(name, 0): ACTIVE for name in names(3)}
    assert world.step().actions == []
    complete(world, names(3), evaluation=metrics(0.9, loss=0.3, samples=100))
    world.now = T0 + seconds(200)
    decision = world.step()

    record = world.status.history[-1]
    assert (record.round, record.kind, record.model_uri) == (1, "evaluate", global_uri(1))
    assert record.participants == names(3)
    assert record.evaluation is not None
    assert record.evaluation.accuracy == pytest.approx(0.9)
    assert decision.actions == [RecordRound(record=record), MergeFinalModel(round=1, best_round=1)]
    assert world.status.stage is Stage.FINALIZING
    assert world.status.message == "merging the final model"
    assert (world.status.best_round, world.status.best_model_uri) == (1, global_uri(1))
    assert world.step().actions == [MergeFinalModel(round=1, best_round=1)]

    world.merged_model_uri = MERGED_URI
    finished_at = T0 + seconds(300)
    world.now = finished_at
    decision = world.step()

    assert decision.actions == [ReleaseAggregator()]
    current = world.status
    assert (current.phase, current.stage) == (Phase.SUCCEEDED, Stage.DONE)
    assert current.final_model_uri == MERGED_URI
    assert current.best_merged_model_uri == BEST_MERGED_URI
    assert current.finished_at == finished_at
    assert current.round_deadline is None
    assert current.message == "finished after 1 rounds; best accuracy 0.9000 at round 1"
    succeeded = condition(current, ConditionType.SUCCEEDED)
    assert (succeeded.status, succeeded.reason, succeeded.last_transition_time) == (
        "True",
        "Completed",
        finished_at,
    )
    progressing = condition(current, PROGRESSING)
    assert (progressing.status, progressing.reason, progressing.last_transition_time) == (
        "False",
        "Completed",
        finished_at,
    )
    assert decision.events == [Event("Normal", "Succeeded", current.message)]

    # A finished training stays as it is, whatever is observed.
    world.memory.failure = Failure("AggregatorError", "late noise")
    world.now = T0 + seconds(10_000)
    decision = world.step()
    assert (decision.actions, decision.events) == ([], [])
    assert world.status == current
    assert_transition_times_honest(world)


def test_evaluation_round_needs_no_quorum_and_survives_failures_and_stragglers() -> None:
    world = World(make_spec(sites=3, rounds=1, retries=1), react=True)
    world.failures = {(1, "site-0", 0): "node lost", (1, "site-0", 1): "node lost again"}
    world.hanging = {(1, "site-1")}
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    final = status.history[-1]
    assert (final.kind, final.participants, final.failed, final.stragglers) == (
        "evaluate",
        ["site-2"],
        ["site-0"],
        ["site-1"],
    )
    assert StartSiteJob(site="site-0", round=1, attempt=1, mode="evaluate") in world.actions
    assert StopSiteJob(site="site-1", round=1, attempt=0, reason="straggler") in world.actions
    assert "QuorumNotMet" not in [event.reason for event in world.events]


def test_training_without_any_evaluation_still_succeeds() -> None:
    world = World(make_spec(rounds=2), react=True, score=lambda round_index, site: None)
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    assert [record.evaluation for record in status.history] == [None, None, None]
    assert (status.best_round, status.best_metric, status.best_model_uri) == (None, None, None)
    assert status.message == "finished after 2 rounds; no site reported accuracy"
    assert (
        Event("Warning", "EvaluationMissing", "no site reported an evaluation of the final model")
        in world.events
    )


# --------------------------------------------------------------------------------------------------
# failures, stragglers, quorum


@pytest.mark.parametrize("retries", [1, 2])
def test_failed_site_is_retried_then_fails_and_the_round_closes_at_min_sites(retries: int) -> None:
    world = start_round_zero(make_spec(retries=retries))
    world.jobs = {("site-0", 0): JobObservation(JobState.FAILED, "CUDA out of memory")}
    world.jobs.update({("site-1", 0): ACTIVE, ("site-2", 0): ACTIVE})
    for attempt in range(1, retries + 1):
        world.now += seconds(20)
        decision = world.step()
        assert decision.actions == [StartSiteJob(site="site-0", round=0, attempt=attempt, mode="train")]
        retried = world.status.site("site-0")
        assert (retried.state, retried.attempt, retried.started_at) == (SiteState.PENDING, attempt, world.now)
        assert retried.message == f"attempt {attempt} after: CUDA out of memory"
        assert decision.events == [
            Event("Warning", "SiteRetry", "round 0: site site-0 failed (CUDA out of memory); retrying")
        ]
        # The old attempt's failure is no longer what counts; the new attempt's Job is.
        world.jobs[("site-0", attempt)] = ACTIVE
        assert world.step().actions == []
        assert world.status.site("site-0").state is SiteState.RUNNING
        world.jobs[("site-0", attempt)] = JobObservation(JobState.FAILED, "CUDA out of memory")

    world.jobs[("site-0", retries)] = JobObservation(JobState.FAILED, "")
    decision = world.step()
    assert decision.actions == []
    failed = world.status.site("site-0")
    assert (failed.state, failed.attempt, failed.finished_at) == (SiteState.FAILED, retries, world.now)
    assert failed.message == "the trainer exited with an error"
    assert decision.events == [
        Event("Warning", "SiteFailed", "round 0: site site-0 failed: the trainer exited with an error")
    ]

    complete(world, ["site-1", "site-2"])
    assert world.step().actions == [CloseRound(round=0, participants=("site-1", "site-2"), rejected=())]
    world.manifest = manifest(0, ["site-1", "site-2"])
    world.step()
    record = world.status.history[-1]
    assert (record.participants, record.failed) == (["site-1", "site-2"], ["site-0"])
    assert world.status.round == 1
    assert world.status.phase is Phase.RUNNING


def test_without_retries_a_failed_site_fails_at_once() -> None:
    world = start_round_zero(make_spec(retries=0))
    world.jobs[("site-0", 0)] = JobObservation(JobState.FAILED, "exit code 1")
    decision = world.step()
    assert of_type(decision.actions, StartSiteJob) == starts(0, ["site-1", "site-2"])  # not seen yet
    assert world.status.site("site-0").state is SiteState.FAILED
    assert [event.reason for event in decision.events] == ["SiteFailed"]


def test_straggler_is_stopped_and_the_round_closes_without_it() -> None:
    world = start_round_zero(make_spec())
    deadline = world.status.round_deadline
    assert deadline == T0 + seconds(TIMEOUT)
    world.jobs[("site-2", 0)] = ACTIVE
    complete(world, ["site-0", "site-1"])
    world.now = deadline - seconds(1)
    assert world.step().actions == []
    assert states(world.status)["site-2"] is SiteState.RUNNING

    world.now = deadline
    decision = world.step()
    assert decision.actions == [
        StopSiteJob(site="site-2", round=0, attempt=0, reason="straggler"),
        CloseRound(round=0, participants=("site-0", "site-1"), rejected=()),
    ]
    straggler = world.status.site("site-2")
    assert (straggler.state, straggler.finished_at) == (SiteState.STRAGGLER, deadline)
    assert straggler.message == f"not finished by the round deadline {deadline.isoformat()}"
    assert decision.events == [Event("Warning", "Straggler", "round 0: site site-2 missed the deadline")]

    # The stopped Job is seen failed afterwards; the straggler stays a straggler.
    world.jobs[("site-2", 0)] = JobObservation(JobState.FAILED, "stopped: straggler")
    world.manifest = manifest(0, ["site-0", "site-1"])
    world.step()
    record = world.status.history[-1]
    assert (record.participants, record.stragglers) == (["site-0", "site-1"], ["site-2"])


def test_a_trained_site_at_the_deadline_is_no_straggler() -> None:
    world = start_round_zero(make_spec())
    complete(world, ["site-0", "site-1"])
    world.jobs[("site-2", 0)] = SUCCEEDED  # finished, verdict not in yet
    world.now = world.status.round_deadline or T0
    decision = world.step()
    assert decision.actions == [SubmitUpdate(site="site-2", round=0)]
    assert world.status.site("site-2").state is SiteState.TRAINED
    complete(world, ["site-2"])
    assert world.step().actions == [CloseRound(round=0, participants=tuple(names(3)), rejected=())]


def test_past_the_deadline_nothing_is_started_only_to_be_stopped() -> None:
    world = start_round_zero(make_spec(sites=4, retries=1))
    complete(world, ["site-0", "site-1"])
    world.jobs[("site-2", 0)] = JobObservation(JobState.FAILED, "evicted")  # site-3's Job: never seen
    world.now = (world.status.round_deadline or T0) + seconds(5)
    decision = world.step()

    assert of_type(decision.actions, StartSiteJob) == []
    assert decision.actions == [
        StopSiteJob(site="site-3", round=0, attempt=0, reason="straggler"),
        CloseRound(round=0, participants=("site-0", "site-1"), rejected=()),
    ]
    assert states(world.status) == {
        "site-0": SiteState.ACCEPTED,
        "site-1": SiteState.ACCEPTED,
        "site-2": SiteState.FAILED,
        "site-3": SiteState.STRAGGLER,
    }
    assert world.status.site("site-2").message == "evicted (not retried: the round deadline has passed)"


def test_quorum_lost_to_stragglers_fails_the_training() -> None:
    world = start_round_zero(make_spec(min_sites=2))
    complete(world, ["site-0"])
    world.jobs.update({("site-1", 0): ACTIVE, ("site-2", 0): ACTIVE})
    world.step()
    world.now = world.status.round_deadline or T0
    decision = world.step()

    message = "round 0: 1 accepted updates, minSites is 2 (accepted: 1, straggler: 2)"
    assert decision.actions == [
        StopSiteJob(site="site-1", round=0, attempt=0, reason="straggler"),
        StopSiteJob(site="site-2", round=0, attempt=0, reason="straggler"),
        ReleaseAggregator(),
    ]
    current = world.status
    assert current.phase is Phase.FAILED
    assert (current.message, current.finished_at, current.round_deadline) == (message, world.now, None)
    failed = condition(current, ConditionType.FAILED)
    assert (failed.status, failed.reason, failed.message, failed.last_transition_time) == (
        "True",
        "QuorumNotMet",
        message,
        world.now,
    )
    assert (condition(current, PROGRESSING).status, condition(current, PROGRESSING).reason) == (
        "False",
        "QuorumNotMet",
    )
    assert condition(current, READY).status == "False"
    assert decision.events == [
        Event("Warning", "Straggler", "round 0: site site-1 missed the deadline"),
        Event("Warning", "Straggler", "round 0: site site-2 missed the deadline"),
        Event("Warning", "QuorumNotMet", message),
    ]
    assert current.history == []

    world.now += seconds(60)
    assert (world.step().actions, world.status) == ([], current)


def test_quorum_out_of_reach_fails_at_once_and_stops_the_sites_still_running() -> None:
    world = start_round_zero(make_spec(min_sites=2))
    world.jobs[("site-2", 0)] = ACTIVE
    complete(world, ["site-0"], accepted=False, reason="norm", message="too large")
    decision = world.step()
    assert states(world.status)["site-0"] is SiteState.REJECTED
    assert world.status.phase is not Phase.FAILED  # site-1 and site-2 may still make it
    assert decision.actions == starts(0, ["site-1"])

    complete(world, ["site-1"], accepted=False, reason="shape", message="head.weight is (9, 64)")
    decision = world.step()

    message = "round 0: at most 1 updates can be accepted, minSites is 2 (running: 1, rejected: 2)"
    current = world.status
    assert current.phase is Phase.FAILED
    assert current.message == message
    assert condition(current, ConditionType.FAILED).reason == "QuorumNotMet"
    assert decision.actions == [
        StopSiteJob(site="site-2", round=0, attempt=0, reason="failed"),
        ReleaseAggregator(),
    ]
    assert decision.events == [
        Event("Warning", "UpdateRejected", "round 0: site site-1: shape: head.weight is (9, 64)"),
        Event("Warning", "QuorumNotMet", message),
    ]


def test_quorum_counts_failed_sites_and_rejections_once_all_are_in() -> None:
    world = start_round_zero(make_spec(min_sites=3, retries=0))
    complete(world, ["site-0", "site-1"])
    world.jobs[("site-2", 0)] = JobObservation(JobState.FAILED, "exit code 137")
    decision = world.step()
    message = "round 0: 2 accepted updates, minSites is 3 (accepted: 2, failed: 1)"
    assert world.status.phase is Phase.FAILED
    assert decision.actions == [ReleaseAggregator()]
    assert [event.reason for event in decision.events] == ["SiteFailed", "QuorumNotMet"]
    assert condition(world.status, ConditionType.FAILED).message == message


def test_aggregator_error_fails_the_training() -> None:
    world = start_round_zero(make_spec())
    world.jobs[("site-0", 0)] = ACTIVE
    complete(world, ["site-1"])
    world.step()
    world.memory.failure = Failure("AggregatorError", "round 0: cannot read the global model")
    world.now = T0 + seconds(30)
    decision = world.step()

    assert decision.actions == [
        StopSiteJob(site="site-0", round=0, attempt=0, reason="failed"),
        StopSiteJob(site="site-2", round=0, attempt=0, reason="failed"),
        ReleaseAggregator(),
    ]
    assert world.status.phase is Phase.FAILED
    assert world.status.finished_at == world.now
    failed = condition(world.status, ConditionType.FAILED)
    assert (failed.status, failed.reason, failed.message) == (
        "True",
        "AggregatorError",
        "round 0: cannot read the global model",
    )
    assert decision.events == [Event("Warning", "AggregatorError", "round 0: cannot read the global model")]


def test_aggregator_error_while_closing_fails_without_stopping_anything() -> None:
    world = start_round_zero(make_spec())
    complete(world, names(3))
    world.step()
    assert world.status.stage is Stage.CLOSING
    world.memory.failure = Failure("AggregatorError", "round 0: no accepted update could be read")
    decision = world.step()
    assert decision.actions == [ReleaseAggregator()]
    assert world.status.phase is Phase.FAILED
    assert condition(world.status, ConditionType.FAILED).reason == "AggregatorError"
    assert not [c for c in world.status.conditions if c.type is ConditionType.INVALID]


def test_a_spec_the_model_refuses_at_initialize_fails_the_training_as_invalid() -> None:
    """A permanent error of reason InvalidSpec (an exchange pattern that matches nothing, found when
    the aggregator builds the model) fails the training and marks its spec Invalid."""
    message = "spec.exchange.layers[0]: 'foo.*' matches no trainable tensor"
    initializing = step(make_spec(), FederatedTrainingStatus(), Observations(), T0).status
    decision = step(make_spec(), initializing, Observations(failure=Failure("InvalidSpec", message)), T0)

    assert decision.status.phase is Phase.FAILED
    assert decision.actions == [ReleaseAggregator()]
    assert decision.events == [Event("Warning", "InvalidSpec", message)]
    for kind in (ConditionType.FAILED, ConditionType.INVALID):
        found = condition(decision.status, kind)
        assert (found.status, found.reason, found.message) == ("True", "InvalidSpec", message)
    assert condition(decision.status, READY).reason == "InvalidSpec"


# --------------------------------------------------------------------------------------------------
# best model and early stopping


def best_after_each_round(world: World) -> list[tuple[int, str, int | None, str | None, int]]:
    """(round, kind, bestRound, bestModelUri, roundsWithoutImprovement) as each round was recorded."""
    return [
        (action.record.round, action.record.kind, entry.decision.status.best_round,
         entry.decision.status.best_model_uri, entry.decision.status.rounds_without_improvement)
        for entry in world.trace
        for action in of_type(entry.decision.actions, RecordRound)
    ]  # fmt: skip


def scores(accuracy: dict[int, float] | None = None, loss: dict[int, float] | None = None) -> Score:
    def score(round_index: int, site: str) -> EvalMetrics:
        return metrics(
            accuracy=(accuracy or {}).get(round_index, 0.5), loss=(loss or {}).get(round_index, 1.0)
        )

    return score


def test_early_stopping_on_accuracy_keeps_the_best_global_model() -> None:
    spec = make_spec(rounds=10, evaluation={"metric": "accuracy", "patience": 1})
    world = World(spec, react=True, score=scores(accuracy={0: 0.5, 1: 0.7, 2: 0.65, 3: 0.6}))
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    assert [(record.round, record.kind) for record in status.history] == [
        (0, "train"),
        (1, "train"),
        (2, "train"),
        (3, "evaluate"),
    ]
    assert best_after_each_round(world) == [
        (0, "train", 0, global_uri(0), 0),
        (1, "train", 1, global_uri(1), 0),
        (2, "train", 1, global_uri(1), 1),
        (3, "evaluate", 1, global_uri(1), 2),
    ]
    # Round 1's sites scored global model 1 (what round 0 produced), not what round 1 produced.
    assert (status.best_round, status.best_model_uri) == (1, global_uri(1))
    assert status.best_metric == pytest.approx(0.7)
    assert of_type(world.actions, StartSiteJob)[-3:] == starts(3, names(3), mode="evaluate")
    assert max(action.round for action in of_type(world.actions, StartSiteJob) if action.mode == "train") == 2
    assert Event("Normal", "EarlyStopped", "no improvement of accuracy for 1 rounds; best was round 1") in (
        world.events
    )
    assert status.message == "finished after 3 rounds; best accuracy 0.7000 at round 1"


def test_early_stopping_on_loss_honours_min_delta() -> None:
    spec = make_spec(rounds=10, evaluation={"metric": "loss", "patience": 2, "minDelta": 0.05})
    losses = {0: 1.0, 1: 0.97, 2: 0.9, 3: 0.88, 4: 0.87, 5: 0.5}
    world = World(spec, react=True, score=scores(loss=losses))
    status = world.run()

    assert best_after_each_round(world) == [
        (0, "train", 0, global_uri(0), 0),
        (1, "train", 0, global_uri(0), 1),  # 0.97 is lower, but by less than minDelta
        (2, "train", 2, global_uri(2), 0),
        (3, "train", 2, global_uri(2), 1),
        (4, "train", 2, global_uri(2), 2),  # patience reached: evaluate next
        (5, "evaluate", 5, global_uri(5), 0),  # the final model scores best
    ]
    assert status.phase is Phase.SUCCEEDED
    assert (status.best_round, status.best_model_uri) == (5, global_uri(5))
    assert status.best_metric == pytest.approx(0.5)
    assert status.message == "finished after 5 rounds; best loss 0.5000 at round 5"


def test_min_delta_on_accuracy_and_no_early_stop_without_patience() -> None:
    flat = scores(accuracy={0: 0.5, 1: 0.53, 2: 0.56})
    stopped = World(make_spec(rounds=5, evaluation={"patience": 1, "minDelta": 0.05}), react=True, score=flat)
    stopped.run()
    assert best_after_each_round(stopped) == [
        (0, "train", 0, global_uri(0), 0),
        (1, "train", 0, global_uri(0), 1),  # 0.53 is better, but by less than minDelta: stop
        (2, "evaluate", 2, global_uri(2), 0),  # 0.56 beats 0.5 by more than minDelta
    ]

    patient = World(make_spec(rounds=3, evaluation={"minDelta": 0.05}), react=True, score=flat)
    patient.run()
    assert [record.round for record in patient.status.history] == [0, 1, 2, 3]
    assert "EarlyStopped" not in [event.reason for event in patient.events]


# --------------------------------------------------------------------------------------------------
# site selection


def test_rounds_run_on_the_selected_sites_and_the_evaluation_on_all() -> None:
    spec = make_spec(sites=6, rounds=4, site_fraction=0.5, min_sites=2)
    world = World(spec, react=True)
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    started = of_type(world.actions, StartSiteJob)
    for round_index in range(4):
        expected = select_sites(spec, round_index)
        assert [action.site for action in started if action.round == round_index] == expected
        assert status.history[round_index].participants == expected
    assert [action for action in started if action.round == 4] == starts(4, names(6), mode="evaluate")
    assert status.history[-1].participants == names(6)


# --------------------------------------------------------------------------------------------------
# suspend and resume


def test_suspend_stops_unfinished_sites_and_resume_restarts_them_under_a_new_attempt() -> None:
    spec = make_spec()
    world = start_round_zero(spec)
    complete(world, ["site-0"], evaluation=metrics(0.6))
    world.jobs[("site-1", 0)] = ACTIVE  # site-2's Job not seen yet
    world.step()
    assert states(world.status) == {
        "site-0": SiteState.ACCEPTED,
        "site-1": SiteState.RUNNING,
        "site-2": SiteState.PENDING,
    }

    suspended_at = T0 + seconds(100)
    world.spec, world.now = with_suspend(spec, True), suspended_at
    decision = world.step()

    assert decision.actions == [
        StopSiteJob(site="site-1", round=0, attempt=0, reason="suspended"),
        StopSiteJob(site="site-2", round=0, attempt=0, reason="suspended"),
    ]
    message = "suspended in round 0; set spec.suspend to false to resume"
    assert (world.status.phase, world.status.stage, world.status.round) == (
        Phase.SUSPENDED,
        Stage.TRAINING,
        0,
    )
    assert world.status.message == message
    suspended = condition(world.status, SUSPENDED)
    assert (suspended.status, suspended.reason, suspended.last_transition_time) == (
        "True",
        "Suspended",
        suspended_at,
    )
    progressing = condition(world.status, PROGRESSING)
    assert (progressing.status, progressing.reason, progressing.last_transition_time) == (
        "False",
        "Suspended",
        suspended_at,
    )
    assert decision.events == [Event("Normal", "Suspended", message)]
    assert condition(world.status, READY).status == "False", "a suspended training is not Ready"

    # While suspended nothing happens, not even at the old deadline.
    held = world.status
    world.jobs[("site-1", 0)] = JobObservation(JobState.FAILED, "stopped: suspended")
    world.now = T0 + seconds(2 * TIMEOUT)
    decision = world.step()
    assert (decision.actions, decision.events, world.status) == ([], [], held)

    resumed_at = T0 + seconds(5000)
    world.spec, world.now = spec, resumed_at
    decision = world.step()

    assert decision.actions == [
        StartSiteJob(site="site-1", round=0, attempt=1, mode="train"),
        StartSiteJob(site="site-2", round=0, attempt=1, mode="train"),
    ]
    current = world.status
    assert (current.phase, current.stage, current.round) == (Phase.RUNNING, Stage.TRAINING, 0)
    assert current.round_deadline == resumed_at + seconds(TIMEOUT)
    assert current.round_started_at == T0, "the round keeps its start: its duration includes the pause"
    assert condition(current, READY).status == "True"
    assert [(site.name, site.state, site.attempt) for site in current.sites] == [
        ("site-0", SiteState.ACCEPTED, 0),
        ("site-1", SiteState.PENDING, 1),
        ("site-2", SiteState.PENDING, 1),
    ]
    assert current.site("site-0").evaluation == metrics(0.6)
    assert current.site("site-1").started_at == resumed_at
    resumed = condition(current, SUSPENDED)
    assert (resumed.status, resumed.reason, resumed.last_transition_time) == ("False", "Resumed", resumed_at)
    assert (condition(current, PROGRESSING).status, condition(current, PROGRESSING).last_transition_time) == (
        "True",
        resumed_at,
    )
    assert decision.events == [Event("Normal", "Resumed", "resumed in round 0")]

    complete(world, ["site-1", "site-2"])
    assert world.step().actions == [CloseRound(round=0, participants=tuple(names(3)), rejected=())]
    assert_transition_times_honest(world)


def test_suspend_before_the_start_and_around_closing() -> None:
    spec = make_spec()
    pending = step(with_suspend(spec, True), FederatedTrainingStatus(), Observations(), T0)
    assert (pending.actions, pending.status.phase) == ([], Phase.SUSPENDED)
    resumed = step(spec, pending.status, Observations(), T0 + seconds(10))
    assert resumed.actions == [InitializeModel()]
    assert (resumed.status.phase, resumed.status.started_at) == (Phase.RUNNING, T0 + seconds(10))

    world = start_round_zero(spec)
    complete(world, names(3))
    world.step()
    assert world.status.stage is Stage.CLOSING
    world.spec = with_suspend(spec, True)
    assert world.step().actions == []
    assert world.status.phase is Phase.SUSPENDED
    world.spec = spec
    assert world.step().actions == [CloseRound(round=0, participants=tuple(names(3)), rejected=())]


def test_a_site_trained_before_the_suspension_is_submitted_after_it() -> None:
    spec = make_spec()
    world = start_round_zero(spec)
    world.jobs = {("site-0", 0): SUCCEEDED, ("site-1", 0): ACTIVE, ("site-2", 0): ACTIVE}
    world.step()
    assert world.status.site("site-0").state is SiteState.TRAINED
    world.spec = with_suspend(spec, True)
    assert of_type(world.step().actions, StopSiteJob) == [
        StopSiteJob(site="site-1", round=0, attempt=0, reason="suspended"),
        StopSiteJob(site="site-2", round=0, attempt=0, reason="suspended"),
    ]
    world.spec = spec
    assert world.step().actions == [
        SubmitUpdate(site="site-0", round=0),
        *starts(0, ["site-1", "site-2"], attempt=1),
    ]


# --------------------------------------------------------------------------------------------------
# restarts: a driver that comes back knows only the persisted status


RESTART_ROUNDS = 2


@cache
def restart_snapshots() -> dict[str, tuple[bool, str]]:
    """(suspended spec?, persisted status JSON) at every phase and stage of a 4-site, 2-round training."""
    spec = make_spec(sites=4, rounds=RESTART_ROUNDS, min_sites=2, retries=1)
    world = World(spec)
    shots: dict[str, tuple[bool, str]] = {}

    def take(name: str, status: FederatedTrainingStatus, suspended: bool = False) -> None:
        shots[name] = (suspended, status.model_dump_json(by_alias=True, exclude_none=True))

    take("pending", world.status)
    world.step()
    take("initializing", world.status)
    world.initial_model_uri = global_uri(0)
    world.step()
    take("training-started", world.status)

    world.jobs = {
        ("site-0", 0): SUCCEEDED,
        ("site-1", 0): SUCCEEDED,
        ("site-2", 0): ACTIVE,
        ("site-3", 0): JobObservation(JobState.FAILED, "boom"),
    }
    world.verdicts = {"site-0": verdict("site-0", 0, evaluation=metrics(0.6))}
    world.step()
    assert states(world.status) == {
        "site-0": SiteState.ACCEPTED,
        "site-1": SiteState.TRAINED,
        "site-2": SiteState.RUNNING,
        "site-3": SiteState.PENDING,
    }
    take("training-mixed", world.status)
    take(
        "failed",
        step(
            spec, world.status, Observations(failure=Failure("AggregatorError", "disk full")), world.now
        ).status,
        False,
    )
    take("suspended", step(with_suspend(spec, True), world.status, Observations(), world.now).status, True)

    complete(world, ["site-1", "site-2"])
    complete(world, ["site-3"], accepted=False, reason="norm", message="too large")
    world.step()
    assert states(world.status)["site-3"] is SiteState.REJECTED
    take("closing", world.status)

    world.manifest = manifest(0, ["site-0", "site-1", "site-2"])
    world.step()
    take("round-1-started", world.status)
    complete(world, names(4))
    world.step()
    world.manifest = manifest(1, names(4))
    world.step()
    assert world.status.stage is Stage.EVALUATING
    complete(world, ["site-0"], evaluation=metrics(0.7))
    world.jobs[("site-1", 0)] = ACTIVE
    world.step()
    take("evaluating", world.status)

    complete(world, ["site-1", "site-2", "site-3"])
    finalizing = world.step().status
    assert finalizing.stage is Stage.FINALIZING
    take("finalizing", finalizing)
    world.merged_model_uri = MERGED_URI
    world.step()
    assert world.status.phase is Phase.SUCCEEDED
    take("succeeded", world.status)
    return shots


RESTART_ACTIONS: dict[str, list[Action]] = {
    "pending": [InitializeModel()],
    "initializing": [InitializeModel()],
    "training-started": starts(0, names(4)),
    "training-mixed": [
        SubmitUpdate(site="site-1", round=0),
        StartSiteJob(site="site-2", round=0, attempt=0, mode="train"),
        StartSiteJob(site="site-3", round=0, attempt=1, mode="train"),
    ],
    "closing": [
        CloseRound(
            round=0,
            participants=("site-0", "site-1", "site-2"),
            rejected=(RejectedUpdate(site="site-3", reason="norm: too large"),),
        )
    ],
    "round-1-started": starts(
        1, names(4), state_from={name: AttemptRef(round=0, attempt=0) for name in names(3)}
    ),
    "evaluating": starts(2, ["site-1", "site-2", "site-3"], mode="evaluate"),
    "finalizing": [MergeFinalModel(round=2, best_round=2)],
    "succeeded": [],
    "failed": [],
    "suspended": [],
}


@pytest.mark.parametrize("name", list(RESTART_ACTIONS))
def test_restart_from_a_persisted_status_reissues_only_what_is_needed(name: str) -> None:
    suspended, saved = restart_snapshots()[name]
    spec = make_spec(sites=4, rounds=RESTART_ROUNDS, min_sites=2, retries=1)
    status = FederatedTrainingStatus.model_validate_json(saved)
    restarted_at = T0 + seconds(60)  # before any round deadline

    decision = step(with_suspend(spec, suspended), status, Observations(), restarted_at)

    assert decision.actions == RESTART_ACTIONS[name]
    assert decision.events == []
    after = decision.status
    if name != "pending":
        assert after == status  # nothing observed: nothing changes (no site lost, no round advanced)
    # The restarted driver finishes the training from there.
    world = World(spec, status=after, now=restarted_at, react=True)
    for action in decision.actions:
        world.execute(action)
    final = world.run()
    if name == "failed":
        assert final.phase is Phase.FAILED
        assert final == status
        return
    assert final.phase is Phase.SUCCEEDED
    assert final.final_model_uri == MERGED_URI
    assert [(record.round, record.kind) for record in final.history] == [
        (0, "train"),
        (1, "train"),
        (RESTART_ROUNDS, "evaluate"),
    ]
    by_round = {record.round: record for record in final.history}
    for site in status.sites:
        if site.state is SiteState.ACCEPTED:
            assert site.name in by_round[status.round].participants
    started = Counter((a.round, a.site, a.attempt) for a in of_type(world.actions, StartSiteJob))
    assert all(count == 1 for count in started.values()), started
    assert all(round_index >= status.round for round_index, _, _ in started)
    if name == "closing":
        assert by_round[0].rejected == [RejectedUpdate(site="site-3", reason="norm: too large")]
    if name in ("training-mixed", "suspended"):
        assert by_round[0].site_evaluation["site-0"] == metrics(0.6)


def test_a_restarted_round_does_not_advance_on_an_older_rounds_manifest() -> None:
    _, saved = restart_snapshots()["round-1-started"]
    status = FederatedTrainingStatus.model_validate_json(saved)
    spec = make_spec(sites=4, rounds=RESTART_ROUNDS)
    decision = step(spec, status, Observations(manifest=manifest(0, names(4))), T0 + seconds(60))
    assert (decision.status.round, decision.status.stage) == (1, Stage.TRAINING)
    assert of_type(decision.actions, RecordRound) == []


# --------------------------------------------------------------------------------------------------
# whole runs


def test_happy_path_three_rounds_three_sites() -> None:
    world = World(make_spec(sites=3, rounds=3), react=True)
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    assert status.final_model_uri == MERGED_URI
    started = Counter(
        (action.round, action.site, action.attempt, action.mode)
        for action in of_type(world.actions, StartSiteJob)
    )
    expected = {(r, site, 0, "train"): 1 for r in range(3) for site in names(3)}
    expected.update({(3, site, 0, "evaluate"): 1 for site in names(3)})
    assert started == expected
    submitted = Counter((action.round, action.site) for action in of_type(world.actions, SubmitUpdate))
    assert submitted == {(r, site): 1 for r in range(4) for site in names(3)}
    assert [action.round for action in of_type(world.actions, CloseRound)] == [0, 1, 2]
    assert of_type(world.actions, MergeFinalModel) == [MergeFinalModel(round=3, best_round=status.best_round)]
    assert of_type(world.actions, InitializeModel) == [InitializeModel()]
    assert of_type(world.actions, StopSiteJob) == []
    assert [action.record for action in of_type(world.actions, RecordRound)] == status.history
    assert [(record.round, record.kind, record.model_uri) for record in status.history] == [
        (0, "train", global_uri(1)),
        (1, "train", global_uri(2)),
        (2, "train", global_uri(3)),
        (3, "evaluate", global_uri(3)),
    ]
    assert all(record.participants == names(3) for record in status.history)
    assert [event.type for event in world.events] == ["Normal"] * len(world.events)
    assert Counter(event.reason for event in world.events) == {
        "RoundStarted": 3,
        "RoundClosed": 3,
        "EvaluationStarted": 1,
        "Succeeded": 1,
    }
    # Accuracy improves every round, so the final model is the best.
    assert (status.best_round, status.best_model_uri) == (3, global_uri(3))
    assert status.best_metric == pytest.approx(0.53)
    assert status.message == "finished after 3 rounds; best accuracy 0.5300 at round 3"
    assert_transition_times_honest(world)


def test_a_long_run_keeps_the_status_history_bounded_and_records_every_round() -> None:
    rounds = 25
    world = World(make_spec(sites=2, rounds=rounds, min_sites=1), react=True)
    status = world.run()

    assert status.phase is Phase.SUCCEEDED
    recorded = [action.record for action in of_type(world.actions, RecordRound)]
    assert [(record.round, record.kind) for record in recorded] == [
        *[(r, "train") for r in range(rounds)],
        (rounds, "evaluate"),
    ]
    assert max(len(entry.decision.status.history) for entry in world.trace) == STATUS_HISTORY_LIMIT
    assert status.history == recorded[-STATUS_HISTORY_LIMIT:]
    assert status.history[0].round == rounds + 1 - STATUS_HISTORY_LIMIT


def test_step_never_mutates_its_input() -> None:
    world = start_round_zero(make_spec())
    complete(world, ["site-0"])
    before = world.status
    copy = before.model_copy(deep=True)
    decision = step(world.spec, before, world.observations(), world.now)
    decision.status.sites[1].state = SiteState.FAILED
    decision.status.history.append(
        RoundRecord(round=0, started_at=T0, closed_at=T0)  # a driver scribbling on the result
    )
    assert before == copy
    assert before.sites[0] is not decision.status.sites[0]


# --------------------------------------------------------------------------------------------------
# waits: shown in a condition, bounded by aggregation.waitTimeoutSeconds, counted from the status


def test_a_wait_is_a_condition_that_clears_when_it_passes() -> None:
    world = start_round_zero(make_spec())
    complete(world, names(3))
    world.step()
    assert world.status.stage is Stage.CLOSING
    world.memory.waiting_for = "POST /v1/rounds/0/close: HTTP 503 store-unavailable"
    world.now += seconds(5)
    decision = world.step()
    waiting = condition(world.status, ConditionType.WAITING)
    assert (waiting.status, waiting.reason, waiting.message) == (
        "True",
        "Waiting",
        "POST /v1/rounds/0/close: HTTP 503 store-unavailable",
    )
    assert waiting.last_transition_time == world.now
    assert of_type(decision.actions, CloseRound) != []  # asked again
    assert (world.status.message or "").startswith("waiting: POST /v1/rounds/0/close")
    world.memory.waiting_for = None
    world.now += seconds(5)
    world.step()
    assert condition(world.status, ConditionType.WAITING).status == "False"
    assert world.status.phase is Phase.RUNNING
    assert not (world.status.message or "").startswith("waiting"), world.status.message


def test_a_wait_past_its_bound_fails_the_training_counting_from_the_persisted_condition() -> None:
    spec = make_spec().model_copy(deep=True)
    spec.aggregation.wait_timeout_seconds = 60
    world = start_round_zero(spec)
    complete(world, names(3))
    world.step()
    world.memory.waiting_for = "aggregator unreachable"
    started = world.now = world.now + seconds(1)
    world.step()
    # A restarted driver knows nothing of the wait but what the status says.
    world.memory = RoundMemory(waiting_for="aggregator unreachable")
    world.status = persisted(world.status)
    world.now = started + seconds(59)
    world.step()
    assert world.status.phase is Phase.RUNNING
    world.now = started + seconds(60)
    decision = world.step()
    assert world.status.phase is Phase.FAILED
    failed = condition(world.status, ConditionType.FAILED)
    assert failed.reason == "WaitTimedOut"
    assert "waitTimeoutSeconds is 60" in failed.message
    assert "aggregator unreachable" in failed.message
    assert decision.events[-1].reason == "WaitTimedOut"
    assert ReleaseAggregator() in decision.actions


def test_a_wait_of_a_known_kind_shows_it_and_fails_with_it_as_the_reason() -> None:
    spec = make_spec().model_copy(deep=True)
    spec.aggregation.wait_timeout_seconds = 30
    world = start_round_zero(spec)
    cause = 'pod wafer-aggregator-1: CreateContainerConfigError: secret "s3" not found'
    world.memory.waiting_for = f"POST /v1/rounds/0/updates: HTTP 503; the aggregator: {cause}"
    world.memory.waiting_reason = "AggregatorUnavailable"
    began = world.step()
    assert [(e.type, e.reason) for e in began.events] == [("Warning", "AggregatorUnavailable")]
    world.now += seconds(5)
    assert world.step().events == [], "once, when the wait begins"
    world.now -= seconds(5)
    waiting = condition(world.status, ConditionType.WAITING)
    assert (waiting.status, waiting.reason) == ("True", "AggregatorUnavailable")
    assert cause in waiting.message
    assert world.status.message == f"waiting: {world.memory.waiting_for}"
    world.now += seconds(30)
    decision = world.step()
    assert world.status.phase is Phase.FAILED
    failed = condition(world.status, ConditionType.FAILED)
    assert failed.reason == "AggregatorUnavailable"
    assert cause in failed.message
    assert "waitTimeoutSeconds is 30" in failed.message
    assert condition(world.status, ConditionType.WAITING).reason == "WaitTimedOut"
    assert decision.events[-1].reason == "AggregatorUnavailable"


def test_an_update_left_out_at_the_close_is_that_sites_rejection() -> None:
    """An update replaced after it was accepted is refused by the aggregator at the close: the site
    counts as rejected (named in an event), the round closes with the others."""
    world = start_round_zero(make_spec(min_sites=2))
    complete(world, names(3))
    world.step()
    world.manifest = manifest(0, ["site-0", "site-2"], [RejectedUpdate(site="site-1", reason="replaced: x")])
    decision = world.step()

    assert world.status.round == 1
    record = world.status.history[-1]
    assert record.participants == ["site-0", "site-2"]
    assert [(r.site, r.reason) for r in record.rejected] == [("site-1", "replaced: x")]
    assert decision.events[0] == Event(
        "Warning", "UpdateRejected", "site site-1: left out of round 0: replaced: x"
    )


def test_updates_left_out_at_the_close_below_min_sites_fail_the_training() -> None:
    world = start_round_zero(make_spec(min_sites=2))
    complete(world, names(3))
    world.step()
    left_out = [RejectedUpdate(site=site, reason="replaced: x") for site in ("site-1", "site-2")]
    world.manifest = manifest(0, ["site-0"], left_out)
    world.step()

    assert world.status.phase is Phase.FAILED
    assert condition(world.status, ConditionType.FAILED).reason == "QuorumNotMet"
    assert world.status.message == "round 0: 1 accepted updates, minSites is 2 (accepted: 1, rejected: 2)"
