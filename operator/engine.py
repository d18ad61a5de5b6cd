"""The round state machine: (spec, status, observations, now) -> (actions, status, events).

Pure: no Kubernetes, no object store, no clock. The local runner and the kopf operator are two thin
drivers of this one function; each observes the world, calls `step`, carries out the actions and
persists the status. Every action is idempotent (deterministic Job names and object keys), so a
driver that restarts, or repeats an action it is not sure took effect, does no harm.

A training goes through rounds 0..R-1 of training, then one evaluation round R in which every site
only scores the final global model, then the final model is merged. Round r's sites first evaluate
the global model r they receive, so round r's metrics describe global model r.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from fedtrain.api import (
    GLOBAL_MODEL_KEY,
    STATUS_HISTORY_LIMIT,
    AttemptRef,
    Condition,
    ConditionType,
    EvalMetrics,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    Phase,
    RejectedUpdate,
    RoundRecord,
    SiteRoundStatus,
    SiteState,
    Stage,
)
from fedtrain.errors import INVALID_SPEC
from fedtrain.evaluation import pool
from fedtrain.messages import RoundManifest, UpdateVerdict
from fedtrain.retention import models_to_delete

from .privacy_budget import budget_message, budget_problem, epsilon_spent, within_budget
from .selection import select_sites

JobMode = Literal["train", "evaluate"]

# --------------------------------------------------------------------------------------------------
# what the drivers observe


class JobState(StrEnum):
    ABSENT = "Absent"  # never created, or gone (deleted, lost with a restarted local runner)
    ACTIVE = "Active"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class JobObservation:
    state: JobState
    message: str = ""


@dataclass(frozen=True)
class Failure:
    """A permanent error a driver met carrying out an action: the training fails with it."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observations:
    """What a driver saw since the last step, about the current round only."""

    initial_model_uri: str | None = None
    jobs: Mapping[tuple[str, int], JobObservation] = field(default_factory=dict)  # (site, attempt)
    verdicts: Mapping[str, UpdateVerdict] = field(default_factory=dict)  # by site
    manifest: RoundManifest | None = None
    merged_model_uri: str | None = None
    best_merged_model_uri: str | None = None
    swag_model_uri: str | None = None
    failure: Failure | None = None
    #: A temporary error the last actions met (the aggregator starting, the store unreachable): the
    #: engine shows it in the Waiting condition and fails the training once it outlasts its bound.
    waiting_for: str | None = None
    #: What kind of wait it is (AggregatorUnavailable, Forbidden): the Waiting condition's reason, and
    #: the Failed condition's once the wait outlasts its bound; None: a wait of no particular kind.
    waiting_reason: str | None = None


# --------------------------------------------------------------------------------------------------
# what the engine asks for


@dataclass(frozen=True)
class InitializeModel:
    """Write the round-0 global model."""


@dataclass(frozen=True)
class StartSiteJob:
    site: str
    round: int
    attempt: int
    mode: JobMode
    #: The attempt whose private state this one starts from (the site's last accepted); None: fresh.
    state_from: AttemptRef | None = None


@dataclass(frozen=True)
class StopSiteJob:
    site: str
    round: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class SubmitUpdate:
    """Hand a finished site's update (or evaluation report) to the aggregator."""

    site: str
    round: int


@dataclass(frozen=True)
class CloseRound:
    round: int
    participants: tuple[str, ...]
    rejected: tuple[RejectedUpdate, ...]


@dataclass(frozen=True)
class AdvanceSecureAggregation:
    """privacy.secureAggregation: let the aggregator end the round's current protocol phase once the
    live sites have done their part (or the phase timed out). Idempotent; asked on every step of a
    training round while a site is at work."""

    round: int
    live: tuple[str, ...]
    started_at: datetime
    now: datetime


@dataclass(frozen=True)
class MergeFinalModel:
    """Merge the final global model, and the best round's (by validation), into plain timm models."""

    round: int
    best_round: int | None = None


@dataclass(frozen=True)
class ApplyRetention:
    """storage.retention: delete a closed round's uploads (`updates`) and the global models of
    `models`, which no round, merge or resume reads any more. Best effort: a deletion that fails
    leaves the objects, never the training."""

    round: int
    updates: bool
    models: tuple[int, ...]


@dataclass(frozen=True)
class RecordRound:
    """Append a closed round to the full history in the object store."""

    record: RoundRecord


@dataclass(frozen=True)
class ReleaseAggregator:
    """The training is over: the aggregator's resources may be given back (its objects stay)."""


Action = (
    InitializeModel
    | StartSiteJob
    | StopSiteJob
    | SubmitUpdate
    | CloseRound
    | AdvanceSecureAggregation
    | MergeFinalModel
    | ApplyRetention
    | RecordRound
    | ReleaseAggregator
)

#: Actions whose result a driver has as soon as the action returns (an aggregator call): the engine can
#: take its next step at once. The others need the world to move (a Job to run) or return nothing.
IMMEDIATE_ACTIONS = (InitializeModel, SubmitUpdate, CloseRound, MergeFinalModel)


def yields_at_once(action: Action) -> bool:
    """Whether a driver that carried out `action` has something new for the engine right away."""
    return isinstance(action, IMMEDIATE_ACTIONS)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    status: FederatedTrainingStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def act(self, action: Action) -> None:
        self.actions.append(action)

    def normal(self, reason: str, message: str) -> None:
        self.events.append(Event("Normal", reason, message))

    def warning(self, reason: str, message: str) -> None:
        self.events.append(Event("Warning", reason, message))


# --------------------------------------------------------------------------------------------------
# pure helpers


def cross_site_matrix(sites: Sequence[SiteRoundStatus]) -> dict[str, dict[str, EvalMetrics]]:
    """evaluation.crossSite: the sites' reports turned into model -> scoring site -> figures."""
    matrix: dict[str, dict[str, EvalMetrics]] = {}
    for site in sites:
        for model, figures in site.cross_site.items():
            matrix.setdefault(model, {})[site.name] = figures.compact()  # the status stays bounded
    return {model: dict(sorted(column.items())) for model, column in sorted(matrix.items())}


def cross_site_accuracy(record: RoundRecord) -> dict[str, dict[str, float]]:
    """The status summary of the N x (N + 1) matrix: test accuracy of each site's local model and of
    the final global model (GLOBAL_MODEL_KEY) on each site's test split; empty without cross-site."""
    if not record.cross_site:
        return {}
    accuracy = {
        model: {site: m.accuracy for site, m in column.items()} for model, column in record.cross_site.items()
    }
    accuracy[GLOBAL_MODEL_KEY] = {site: m.accuracy for site, m in record.site_test_evaluation.items()}
    return accuracy


def set_condition(
    status: FederatedTrainingStatus,
    kind: ConditionType,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
) -> None:
    """Set a condition; its transition time moves only when its status changes."""
    text: Literal["True", "False"] = "True" if value else "False"
    for index, condition in enumerate(status.conditions):
        if condition.type is kind:
            changed = condition.status != text
            status.conditions[index] = Condition(
                type=kind,
                status=text,
                reason=reason,
                message=message,
                last_transition_time=now if changed else condition.last_transition_time,
            )
            return
    status.conditions.append(
        Condition(type=kind, status=text, reason=reason, message=message, last_transition_time=now)
    )


# --------------------------------------------------------------------------------------------------
# the step


def step(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    now: datetime,
) -> Decision:
    """Decide what to do next. Never mutates its arguments.

    The stages run in order within one step, so a round whose last site just finished is closed,
    and a closed round's successor started, as soon as what they need has been observed.
    """
    decision = Decision(status=status.model_copy(deep=True))
    current = decision.status
    if current.phase.finished:
        return decision
    if spec.suspend:
        _suspend(current, decision, now)
        return decision
    if current.phase is Phase.SUSPENDED:
        _resume(spec, current, decision, now)
    if current.phase is Phase.PENDING:
        _begin(current, now)
    if observations.failure is not None:
        _fail(current, decision, observations.failure.reason, observations.failure.message, now)
        return decision
    if _waited_too_long(spec, current, observations, decision, now):
        return decision
    for stage in (_initializing, _sites_at_work, _closing, _finalizing):
        if stage(spec, current, observations, decision, now):
            break
    return decision


def _begin(status: FederatedTrainingStatus, now: datetime) -> None:
    status.phase = Phase.RUNNING
    status.stage = Stage.INITIALIZING
    status.started_at = now
    status.message = "writing the initial global model"
    set_condition(status, ConditionType.PROGRESSING, True, "Initializing", status.message, now)
    set_condition(status, ConditionType.READY, True, "Running", "the training is running", now)


# Each stage handler acts if the training is in its stage; True ends the step there.


def _initializing(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> bool:
    if status.stage is not Stage.INITIALIZING:
        return False
    if (problem := budget_problem(spec)) is not None:
        _fail(status, decision, INVALID_SPEC, problem, now)
        return True
    if observations.initial_model_uri is None:
        decision.act(InitializeModel())
        return True
    status.global_model_uri = observations.initial_model_uri
    _start_round(spec, status, decision, 0, now)
    return True


def _sites_at_work(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> bool:
    if status.stage not in (Stage.TRAINING, Stage.EVALUATING):
        return False
    _advance_sites(spec, status, observations, decision, now)
    shortfall = _quorum_shortfall(spec, status) if status.stage is Stage.TRAINING else None
    if shortfall is not None:
        _fail(status, decision, "QuorumNotMet", shortfall, now)
        return True
    if all(site.state.terminal for site in status.sites):
        _round_complete(spec, status, decision, now)
    elif _secure_round(spec, status):
        live = tuple(site.name for site in status.sites if site.state in _LIVE)
        decision.act(AdvanceSecureAggregation(status.round, live, status.round_started_at or now, now))
    return False


#: The site states whose site may still take part in a round's secure aggregation.
_LIVE = (SiteState.PENDING, SiteState.RUNNING, SiteState.TRAINED, SiteState.ACCEPTED)


def _secure_round(spec: FederatedTrainingSpec, status: FederatedTrainingStatus) -> bool:
    """Whether the current round runs secure aggregation: a training round under the option."""
    return spec.privacy.secure_aggregation is not None and status.stage is Stage.TRAINING


def _closing(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> bool:
    if status.stage is not Stage.CLOSING:
        return False
    if observations.manifest is None or observations.manifest.round != status.round:
        decision.act(_close_action(status))
        return False
    _left_out_at_close(status, observations.manifest, decision)
    shortfall = _quorum_shortfall(spec, status)
    if shortfall is not None:
        _fail(status, decision, "QuorumNotMet", shortfall, now)
        return True
    _record_training_round(spec, status, observations.manifest, decision, now)
    return False


def _left_out_at_close(status: FederatedTrainingStatus, manifest: RoundManifest, decision: Decision) -> None:
    """Accepted sites the aggregator did not fold at the close (an update replaced or deleted after it
    was accepted) are that site's rejection: the round closes with the others, quorum permitting."""
    folded = {participant.site for participant in manifest.participants}
    reasons = {rejection.site: rejection.reason for rejection in manifest.rejected}
    for site in status.sites:
        if site.state is SiteState.ACCEPTED and site.name not in folded:
            site.state = SiteState.REJECTED
            site.message = reasons.get(site.name, "left out when the round closed")
            decision.warning(
                "UpdateRejected", f"site {site.name}: left out of round {status.round}: {site.message}"
            )


def _finalizing(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> bool:
    if status.stage is not Stage.FINALIZING:
        return False
    if observations.merged_model_uri is None:
        decision.act(MergeFinalModel(round=status.round, best_round=status.best_round))
        return True
    status.final_model_uri = observations.merged_model_uri
    status.best_merged_model_uri = observations.best_merged_model_uri
    status.swag_model_uri = observations.swag_model_uri
    status.stage = Stage.DONE
    status.phase = Phase.SUCCEEDED
    status.finished_at = now
    status.round_deadline = None
    metric = spec.evaluation.metric.value
    best = (
        f"best {metric} {status.best_metric:.4f} at round {status.best_round}"
        if status.best_metric is not None
        else f"no site reported {metric}"
    )
    status.message = f"finished after {status.round} rounds; {best}"
    set_condition(status, ConditionType.SUCCEEDED, True, "Completed", status.message, now)
    set_condition(status, ConditionType.PROGRESSING, False, "Completed", status.message, now)
    decision.normal("Succeeded", status.message)
    decision.act(ReleaseAggregator())
    return True


#: The status message of a training that waits: the wait's cause follows.
WAITING_PREFIX = "waiting: "


def _waited_too_long(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> bool:
    """Keep the Waiting condition; True if the wait outlasted its bound and the training failed.

    The wait starts at the condition's transition time, which lives in the status: a restarted driver
    goes on counting from there. A wait of a known kind fails with that kind as its reason (the cause
    is in the message); any other with WaitTimedOut.
    """
    waiting_for = observations.waiting_for
    waiting = next((c for c in status.conditions if c.type is ConditionType.WAITING), None)
    if waiting_for is None:
        if waiting is not None and waiting.status == "True":
            set_condition(status, ConditionType.WAITING, False, "Resolved", "nothing to wait for", now)
            if (status.message or "").startswith(WAITING_PREFIX):  # back to what the training is doing
                progressing = next(
                    (c for c in status.conditions if c.type is ConditionType.PROGRESSING), None
                )
                status.message = progressing.message if progressing is not None else ""
        return False
    since = waiting.last_transition_time if waiting is not None and waiting.status == "True" else now
    bound = spec.aggregation.wait_timeout_seconds
    waited = (now - since).total_seconds()
    if waited < bound:
        reason = observations.waiting_reason or "Waiting"
        if observations.waiting_reason and (waiting is None or waiting.status != "True"):
            decision.warning(reason, waiting_for)  # a wait of a known kind begins: say so once
        set_condition(status, ConditionType.WAITING, True, reason, waiting_for, now)
        status.message = f"{WAITING_PREFIX}{waiting_for}"  # what `kubectl get ft -o wide` shows
        return False
    message = (
        f"gave up after waiting {waited:.0f} s (aggregation.waitTimeoutSeconds is {bound}): {waiting_for}"
    )
    set_condition(status, ConditionType.WAITING, False, "WaitTimedOut", message, now)
    _fail(status, decision, observations.waiting_reason or "WaitTimedOut", message, now)
    return True


def _start_round(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    decision: Decision,
    round_index: int,
    now: datetime,
    mode: JobMode = "train",
) -> None:
    sites = select_sites(spec, round_index) if mode == "train" else [site.name for site in spec.sites]
    status.round = round_index
    status.stage = Stage.TRAINING if mode == "train" else Stage.EVALUATING
    status.round_started_at = now
    status.round_deadline = now + timedelta(seconds=spec.aggregation.round_timeout_seconds)
    status.sites = [SiteRoundStatus(name=name, started_at=now) for name in sites]
    for name in sites:
        decision.act(_start_job(spec, status, name, 0, mode))
    if mode == "train":
        status.message = f"round {round_index + 1} of {spec.training.rounds}: {len(sites)} sites training"
        decision.normal("RoundStarted", f"round {round_index} started with sites {', '.join(sites)}")
    else:
        status.message = f"evaluating the final model on {len(sites)} sites"
        decision.normal("EvaluationStarted", status.message)
    set_condition(status, ConditionType.PROGRESSING, True, "RoundRunning", status.message, now)


def _mode(status: FederatedTrainingStatus) -> JobMode:
    return "evaluate" if status.stage is Stage.EVALUATING else "train"


def _start_job(
    spec: FederatedTrainingSpec, status: FederatedTrainingStatus, site: str, attempt: int, mode: JobMode
) -> StartSiteJob:
    """Start a site's attempt; a training attempt starts from the site's last committed private state,
    and so does an evaluation where the site keeps personal tensors there (spec.exchange, localOnly)."""
    reads_state = mode == "train" or spec.keeps_personal
    state_from = status.site_states.get(site) if reads_state else None
    return StartSiteJob(site=site, round=status.round, attempt=attempt, mode=mode, state_from=state_from)


def _advance_sites(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> None:
    deadline = status.round_deadline
    overdue = deadline is not None and now >= deadline
    for site in status.sites:
        if site.state is SiteState.TRAINED:
            _take_verdict(status, site, observations, decision, now)
        elif not site.state.terminal:
            job = observations.jobs.get((site.name, site.attempt), JobObservation(JobState.ABSENT))
            _follow_job(spec, status, site, job, observations, decision, now, overdue)
    if deadline is not None and overdue:
        _mark_stragglers(status, deadline, decision, now)


def _follow_job(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    site: SiteRoundStatus,
    job: JobObservation,
    observations: Observations,
    decision: Decision,
    now: datetime,
    overdue: bool,
) -> None:
    """A site still at work, by what its current attempt's Job is doing."""
    if job.state is JobState.ABSENT:
        # Never started, or lost (a restarted local runner, a deleted Job): start it again.
        # The Job name and the object keys are deterministic, so this cannot duplicate work.
        # Past the deadline the site is about to become a straggler: starting it would only
        # create a Job to delete in the same breath.
        if not overdue:
            decision.act(_start_job(spec, status, site.name, site.attempt, _mode(status)))
    elif job.state is JobState.ACTIVE:
        site.state = SiteState.RUNNING
    elif job.state is JobState.SUCCEEDED:
        site.state = SiteState.TRAINED
        _take_verdict(status, site, observations, decision, now)
    elif job.state is JobState.FAILED:
        _site_failed(spec, status, site, job.message, decision, now, retry=not overdue)


def _take_verdict(
    status: FederatedTrainingStatus,
    site: SiteRoundStatus,
    observations: Observations,
    decision: Decision,
    now: datetime,
) -> None:
    """A trained site: hand its update to the aggregator, or record the verdict it gave."""
    verdict = _verdict(observations, site.name, status.round)
    if verdict is None:
        decision.act(SubmitUpdate(site=site.name, round=status.round))
    else:
        _apply_verdict(status, site, verdict, decision, now)


def _mark_stragglers(
    status: FederatedTrainingStatus, deadline: datetime, decision: Decision, now: datetime
) -> None:
    for site in status.sites:
        if site.state in (SiteState.PENDING, SiteState.RUNNING):
            site.state = SiteState.STRAGGLER
            site.finished_at = now
            site.message = f"not finished by the round deadline {deadline.isoformat()}"
            decision.act(
                StopSiteJob(site=site.name, round=status.round, attempt=site.attempt, reason="straggler")
            )
            decision.warning("Straggler", f"round {status.round}: site {site.name} missed the deadline")


def _verdict(observations: Observations, site: str, round_index: int) -> UpdateVerdict | None:
    """The aggregator's verdict on a site's update of this round; one left over from another is ignored."""
    verdict = observations.verdicts.get(site)
    return verdict if verdict is not None and verdict.round == round_index else None


def _apply_verdict(
    status: FederatedTrainingStatus,
    site: SiteRoundStatus,
    verdict: UpdateVerdict,
    decision: Decision,
    now: datetime,
) -> None:
    site.finished_at = now
    site.samples = verdict.samples
    site.evaluation = verdict.evaluation
    site.test_evaluation = verdict.test_evaluation
    site.test_uncertainty = verdict.test_uncertainty
    site.cross_site = dict(verdict.cross_site)
    site.update_bytes = verdict.update_bytes
    site.train_seconds = verdict.train_seconds
    if verdict.accepted:
        site.state = SiteState.ACCEPTED
        site.message = None
        if status.stage is Stage.TRAINING:
            # The state this attempt wrote before its update is the site's from now on.
            status.site_states[site.name] = AttemptRef(round=status.round, attempt=site.attempt)
        elif verdict.site_model_uri is not None:  # the final evaluation: the site's own model
            status.site_model_uris[site.name] = verdict.site_model_uri
    else:
        site.state = SiteState.REJECTED
        site.message = ": ".join(part for part in (verdict.reason, verdict.message) if part) or "rejected"
        decision.warning("UpdateRejected", f"round {verdict.round}: site {site.name}: {site.message}")


def _site_failed(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    site: SiteRoundStatus,
    message: str,
    decision: Decision,
    now: datetime,
    retry: bool,
) -> None:
    detail = message or "the trainer exited with an error"
    retries_left = site.attempt < spec.aggregation.site_retries
    if retries_left and _secure_round(spec, status):
        # A new attempt would bring new keys, which the round's key exchange cannot take in: the
        # site is a dropout, which the protocol recovers from while enough sites survive.
        retry, detail = False, f"{detail} (not retried: a secure-aggregation round takes no new keys)"
    elif retries_left and not retry:
        detail = f"{detail} (not retried: the round deadline has passed)"
    if retries_left and retry:
        site.attempt += 1
        site.state = SiteState.PENDING
        site.started_at = now
        site.message = f"attempt {site.attempt} after: {detail}"
        decision.act(_start_job(spec, status, site.name, site.attempt, _mode(status)))
        decision.warning("SiteRetry", f"round {status.round}: site {site.name} failed ({detail}); retrying")
    else:
        site.state = SiteState.FAILED
        site.finished_at = now
        site.message = detail
        decision.warning("SiteFailed", f"round {status.round}: site {site.name} failed: {detail}")


def _close_action(status: FederatedTrainingStatus) -> CloseRound:
    return CloseRound(
        round=status.round,
        participants=tuple(site.name for site in status.sites if site.state is SiteState.ACCEPTED),
        rejected=tuple(
            RejectedUpdate(site=site.name, reason=site.message or "rejected")
            for site in status.sites
            if site.state is SiteState.REJECTED
        ),
    )


def _round_complete(
    spec: FederatedTrainingSpec, status: FederatedTrainingStatus, decision: Decision, now: datetime
) -> None:
    if status.stage is Stage.EVALUATING:
        record = _record(status, now, kind="evaluate", model_uri=status.global_model_uri)
        _remember(status, record, decision)
        status.test_evaluation = record.test_evaluation
        status.test_uncertainty = record.test_uncertainty
        status.cross_site_accuracy = cross_site_accuracy(record)
        best_before = status.best_round
        if record.evaluation is not None:
            _track_best(spec, status, status.round, status.global_model_uri, record.evaluation)
        else:
            decision.warning("EvaluationMissing", "no site reported an evaluation of the final model")
        _retain(spec, status, decision, updates=False, newest=status.round, best_before=best_before)
        status.stage = Stage.FINALIZING
        status.message = "merging the final model"
        return
    accepted = sum(site.state is SiteState.ACCEPTED for site in status.sites)
    status.stage = Stage.CLOSING
    status.message = f"closing round {status.round} with {accepted} updates"


def _quorum_shortfall(spec: FederatedTrainingSpec, status: FederatedTrainingStatus) -> str | None:
    """Why the training round can no longer close, or None while minSites updates may still be accepted.

    Checked as sites finish, not only when all have: once too many are rejected, failed or late, the
    training fails at once instead of paying for the remaining sites' training.
    """
    needed = spec.aggregation.min_sites
    hopeful = (SiteState.PENDING, SiteState.RUNNING, SiteState.TRAINED, SiteState.ACCEPTED)
    possible = sum(site.state in hopeful for site in status.sites)
    if possible >= needed:
        return None
    counts = ", ".join(
        f"{state.value.lower()}: {count}"
        for state in SiteState
        if (count := sum(site.state is state for site in status.sites))
    )
    accepted = sum(site.state is SiteState.ACCEPTED for site in status.sites)
    if possible == accepted:
        return f"round {status.round}: {accepted} accepted updates, minSites is {needed} ({counts})"
    return (
        f"round {status.round}: at most {possible} updates can be accepted, minSites is {needed} ({counts})"
    )


def _record(
    status: FederatedTrainingStatus,
    now: datetime,
    kind: Literal["train", "evaluate"],
    model_uri: str | None,
) -> RoundRecord:
    per_site = {site.name: site.evaluation for site in status.sites if site.evaluation is not None}
    per_site_test = {site.name: site.test_evaluation for site in status.sites if site.test_evaluation}
    per_site_uncertain = {site.name: site.test_uncertainty for site in status.sites if site.test_uncertainty}
    return RoundRecord(
        round=status.round,
        kind=kind,
        started_at=status.round_started_at or now,
        closed_at=now,
        participants=[site.name for site in status.sites if site.state is SiteState.ACCEPTED],
        stragglers=[site.name for site in status.sites if site.state is SiteState.STRAGGLER],
        failed=[site.name for site in status.sites if site.state is SiteState.FAILED],
        rejected=[
            RejectedUpdate(site=site.name, reason=site.message or "rejected")
            for site in status.sites
            if site.state is SiteState.REJECTED
        ],
        # Macro-F1 and ECE of the pooled predictions, from the sum of the sites' counts; the history
        # keeps each site's figures without its counts (the status stays bounded).
        evaluation=pool(per_site),
        site_evaluation={site: figures.compact() for site, figures in per_site.items()},
        test_evaluation=pool(per_site_test),
        site_test_evaluation={site: figures.compact() for site, figures in per_site_test.items()},
        cross_site=cross_site_matrix(status.sites),
        test_uncertainty=pool(per_site_uncertain),
        site_test_uncertainty={site: figures.compact() for site, figures in per_site_uncertain.items()},
        bytes_uploaded=sum(site.update_bytes or 0 for site in status.sites),
        site_bytes={site.name: site.update_bytes for site in status.sites if site.update_bytes is not None},
        model_uri=model_uri,
    )


def _remember(status: FederatedTrainingStatus, record: RoundRecord, decision: Decision) -> None:
    status.history = [
        *[r for r in status.history if (r.round, r.kind) != (record.round, record.kind)],
        record,
    ]
    status.history = status.history[-STATUS_HISTORY_LIMIT:]
    decision.act(RecordRound(record=record))


def _track_best(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    round_index: int,
    model_uri: str | None,
    evaluation: EvalMetrics,
) -> bool:
    value = evaluation.value(spec.evaluation.metric)
    if spec.evaluation.improves(value, status.best_metric):
        status.best_metric = value
        status.best_round = round_index
        status.best_model_uri = model_uri
        status.rounds_without_improvement = 0
        return True
    status.rounds_without_improvement += 1
    return False


def _record_training_round(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    manifest: RoundManifest,
    decision: Decision,
    now: datetime,
) -> None:
    evaluated_model = status.global_model_uri  # the model this round's sites scored before training
    record = _record(status, now, kind="train", model_uri=manifest.model_uri)
    record.left_out = list(manifest.not_selected)
    record.trimmed_share = dict(manifest.trimmed_share)
    record.epsilon = status.privacy_epsilon = epsilon_spent(spec, status.round + 1)
    if manifest.secure_aggregation is not None:
        record.secure_dropouts = sorted(set(manifest.secure_aggregation.shared) - set(record.participants))
    _remember(status, record, decision)
    best_before = status.best_round
    if record.evaluation is not None:
        _track_best(spec, status, status.round, evaluated_model, record.evaluation)
    status.global_model_uri = manifest.model_uri
    _retain(spec, status, decision, updates=True, newest=status.round + 1, best_before=best_before)
    accuracy = f"{record.evaluation.accuracy:.3f}" if record.evaluation else "n/a"
    decision.normal(
        "RoundClosed",
        f"round {status.round} closed with {len(manifest.participants)} updates; "
        f"global model {status.round} accuracy {accuracy}",
    )
    next_round = status.round + 1
    patience = spec.evaluation.patience
    if patience is not None and status.rounds_without_improvement >= patience:
        decision.normal(
            "EarlyStopped",
            f"no improvement of {spec.evaluation.metric.value} for {patience} rounds; "
            f"best was round {status.best_round}",
        )
        _start_round(spec, status, decision, next_round, now, mode="evaluate")
    elif next_round >= spec.training.rounds:
        _start_round(spec, status, decision, next_round, now, mode="evaluate")
    elif not within_budget(spec, next_round + 1):
        message = budget_message(spec, next_round)
        decision.normal("PrivacyBudgetReached", message)
        set_condition(status, ConditionType.PRIVACY_BUDGET, True, "BudgetReached", message, now)
        _start_round(spec, status, decision, next_round, now, mode="evaluate")
    else:
        _start_round(spec, status, decision, next_round, now)


def _retain(
    spec: FederatedTrainingSpec,
    status: FederatedTrainingStatus,
    decision: Decision,
    updates: bool,
    newest: int,
    best_before: int | None,
) -> None:
    """storage.retention once round `status.round` is over and model `newest` exists: its uploads
    (a training round's) and the global models that just stopped being needed."""
    retention = spec.retention
    # A training round's close writes model `newest`; the final evaluation writes none.
    models = models_to_delete(retention, newest, best_before, status.best_round, window_moved=updates)
    delete_updates = updates and retention.delete_updates
    if delete_updates or models:
        decision.act(ApplyRetention(round=status.round, updates=delete_updates, models=models))


def _stop_running_sites(status: FederatedTrainingStatus, decision: Decision, reason: str) -> None:
    for site in status.sites:
        if site.state in (SiteState.PENDING, SiteState.RUNNING):
            decision.act(StopSiteJob(site=site.name, round=status.round, attempt=site.attempt, reason=reason))


def _fail(
    status: FederatedTrainingStatus, decision: Decision, reason: str, message: str, now: datetime
) -> None:
    _stop_running_sites(status, decision, "failed")
    status.phase = Phase.FAILED
    status.finished_at = now
    status.round_deadline = None
    status.message = message
    set_condition(status, ConditionType.FAILED, True, reason, message, now)
    set_condition(status, ConditionType.PROGRESSING, False, reason, message, now)
    set_condition(status, ConditionType.READY, False, reason, message, now)
    if reason == INVALID_SPEC:  # the spec is at fault, as where a driver refuses it before it runs
        set_condition(status, ConditionType.INVALID, True, reason, message, now)
    decision.warning(reason, message)
    decision.act(ReleaseAggregator())


def _suspend(status: FederatedTrainingStatus, decision: Decision, now: datetime) -> None:
    if status.phase is Phase.SUSPENDED:
        return
    _stop_running_sites(status, decision, "suspended")
    status.phase = Phase.SUSPENDED
    status.message = f"suspended in round {status.round}; set spec.suspend to false to resume"
    set_condition(status, ConditionType.SUSPENDED, True, "Suspended", status.message, now)
    set_condition(status, ConditionType.READY, False, "Suspended", status.message, now)
    set_condition(status, ConditionType.PROGRESSING, False, "Suspended", status.message, now)
    decision.normal("Suspended", status.message)


def _resume(
    spec: FederatedTrainingSpec, status: FederatedTrainingStatus, decision: Decision, now: datetime
) -> None:
    """Sites cut off by the suspension start again under a new attempt; finished sites are kept.

    Only the attempt is moved on here: the step's `_advance_sites` then finds the new attempt's Job
    absent and asks for it, once.
    """
    status.phase = Phase.RUNNING if status.started_at else Phase.PENDING
    if status.stage in (Stage.TRAINING, Stage.EVALUATING):
        # The round keeps its start (its record's duration includes the pause); the sites get a
        # full round timeout again from now.
        status.round_deadline = now + timedelta(seconds=spec.aggregation.round_timeout_seconds)
        for site in status.sites:
            if site.state in (SiteState.PENDING, SiteState.RUNNING):
                site.attempt += 1
                site.state = SiteState.PENDING
                site.started_at = now
    status.message = f"resumed in round {status.round}"
    set_condition(status, ConditionType.SUSPENDED, False, "Resumed", status.message, now)
    set_condition(status, ConditionType.READY, True, "Running", status.message, now)
    set_condition(status, ConditionType.PROGRESSING, True, "Resumed", status.message, now)
    decision.normal("Resumed", status.message)
