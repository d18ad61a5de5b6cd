"""The driver core: everything a driver does around `engine.step`, written once for both drivers.

A driver (the local runner, the kopf reconciler) differs from the other only in its ports: how a Job
runs (`JobPort`), how the aggregator is reached (`AggregatorPort`), how URLs are signed and base
weights found (`CredentialsPort`), and where history goes (`HistoryPort`). The core keeps the
per-round memory of what the actions answered, builds each trainer job and its URLs, knows which
actions yield a result at once, chains engine steps while they do, and turns every classified error
into what the engine observes: a `TemporaryError` into a wait (bounded by the engine), a
`PermanentError` into a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from fedtrain.api import (
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    RejectedUpdate,
    RoundRecord,
    UncertaintyMethod,
)
from fedtrain.errors import DEFAULT_RETRY_SECONDS, PermanentError, TemporaryError
from fedtrain.job import CROSS_SITE_FIELD, Sealing, SecureAggregationUrls, TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.messages import ModelReply, RoundManifest, SecureAggregationReply, UpdateVerdict
from fedtrain.sealing import DataKey
from fedtrain.store import MAX_PRESIGN_SECONDS

from .engine import (
    Action,
    AdvanceSecureAggregation,
    ApplyRetention,
    CloseRound,
    Event,
    Failure,
    InitializeModel,
    JobObservation,
    MergeFinalModel,
    Observations,
    RecordRound,
    ReleaseAggregator,
    StartSiteJob,
    StopSiteJob,
    SubmitUpdate,
    step,
    yields_at_once,
)

log = logging.getLogger(__name__)

#: Engine steps chained in one pass (one status write): submit, close, start the next round, with room
#: to spare; a longer chain goes on in the next pass.
MAX_STEPS_PER_PASS = 8
#: A secure-aggregation round in these phases waits for the sites' objects in the store: the driver
#: steps again within SECURE_POLL_SECONDS (the operator's resync would otherwise wait 30 s a phase).
SECURE_WAITING_PHASES = frozenset({"keys", "shares", "inputs"})
SECURE_POLL_SECONDS = 1.0
#: Actions on different sites (and the history record) are independent and run at once; the
#: aggregator's own calls (initialize, close, merge) run first, in order.
INDEPENDENT_ACTIONS = (StartSiteJob, StopSiteJob, SubmitUpdate, RecordRound)

JobKey = tuple[str, int]  # site, attempt


# --------------------------------------------------------------------------------------------------
# the ports a driver provides


class Signer(Protocol):
    """Presigns object URLs: an ObjectStore is one."""

    def presign_get(self, key: str, expires_seconds: int) -> str: ...
    def presign_put(self, key: str, expires_seconds: int) -> str: ...


class AggregatorPort(Protocol):
    async def initialize(self) -> str: ...
    async def submit(self, round_index: int, site: str) -> UpdateVerdict: ...
    async def close(
        self, round_index: int, participants: list[str], rejected: list[RejectedUpdate]
    ) -> RoundManifest: ...
    async def advance_secure(
        self, round_index: int, live: list[str], started_at: datetime, now: datetime
    ) -> SecureAggregationReply: ...
    async def merge(self, round_index: int, best_round: int | None) -> ModelReply: ...

    async def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int: ...
    async def release(self) -> None: ...


class JobPort(Protocol):
    async def start(self, action: StartSiteJob, job: TrainerJob) -> None: ...
    async def stop(self, action: StopSiteJob) -> None: ...
    def observe(self, round_index: int) -> Mapping[JobKey, JobObservation]: ...


class CredentialsPort(Protocol):
    async def signer(self) -> Signer: ...
    async def pretrained_url(self, expires_seconds: int) -> str | None: ...
    async def data_key(self) -> DataKey | None:
        """The training's data key under privacy.encryptAtRest (None without it)."""
        ...


class HistoryPort(Protocol):
    async def record(self, record: RoundRecord, status: FederatedTrainingStatus) -> None: ...


# --------------------------------------------------------------------------------------------------
# what a trainer job gets


def url_expiry_seconds(spec: FederatedTrainingSpec, grace_seconds: int) -> int:
    """Presigned URLs live for the round's timeout plus a grace: the whole attempt, and no longer."""
    return min(MAX_PRESIGN_SECONDS, spec.aggregation.round_timeout_seconds + grace_seconds)


def build_trainer_job(
    spec: FederatedTrainingSpec,
    layout: TrainingLayout,
    action: StartSiteJob,
    signer: Signer,
    expires_seconds: int,
    pretrained_url: str | None,
    transfer_deadline: datetime | None = None,
    data_key: DataKey | None = None,
) -> TrainerJob:
    """One attempt's job: its slice of the spec and URLs for exactly the objects it may touch.

    A training attempt reads the private state of the site's last accepted attempt and writes its
    own; an evaluation writes none, and reads it only where the site keeps personal tensors there
    (spec.exchange other than all, or mode localOnly), which the evaluated model needs. Where the
    spec publishes site models, an evaluation also gets a PUT URL for the site's own merged model."""
    job = TrainerJob(
        training=layout.name,
        round=action.round,
        site=action.site,
        attempt=action.attempt,
        mode=action.mode,
        spec=TrainerSpec.for_site(spec, action.site),
        global_model_url=signer.presign_get(layout.global_model(action.round), expires_seconds),
        update_url=signer.presign_put(layout.update(action.round, action.site), expires_seconds),
        **_site_urls(spec, layout, action, signer, expires_seconds),
        pretrained_url=pretrained_url,
        transfer_deadline=transfer_deadline,
        secure_aggregation=_secure_aggregation_urls(spec, layout, action, signer, expires_seconds),
        cross_site_urls={
            site: signer.presign_get(key, expires_seconds)
            for site, key in _cross_site_models(spec, layout, action).items()
        },
    )
    if data_key is not None:
        job.sealing = _sealing(data_key, spec, layout, action, job)
    return job


def _site_urls(
    spec: FederatedTrainingSpec, layout: TrainingLayout, action: StartSiteJob, signer: Signer, expires: int
) -> dict[str, str | None]:
    """The URLs of the site's own objects beside its update: its private state (read, written), its
    merged model (the final evaluation, where the spec publishes them), SCAFFOLD's control variate."""
    training = action.mode == "train"
    state_from = action.state_from
    swag_put, swag_get = _swag_models(spec, layout, action)
    return {
        "swag_put_url": signer.presign_put(swag_put, expires) if swag_put else None,
        "swag_get_url": signer.presign_get(swag_get, expires) if swag_get else None,
        "state_get_url": (
            signer.presign_get(layout.site_state(action.site, state_from.round, state_from.attempt), expires)
            if (training or spec.keeps_personal) and state_from is not None
            else None
        ),
        "state_put_url": (
            signer.presign_put(layout.site_state(action.site, action.round, action.attempt), expires)
            if training
            else None
        ),
        "site_model_url": (
            signer.presign_put(layout.site_merged_model(action.site), expires)
            if not training and spec.publishes_site_models
            else None
        ),
        "control_url": (
            signer.presign_get(layout.server_control(action.round), expires)
            if training and spec.aggregation.scaffold
            else None
        ),
    }


def _secure_aggregation_urls(
    spec: FederatedTrainingSpec, layout: TrainingLayout, action: StartSiteJob, signer: Signer, expires: int
) -> SecureAggregationUrls | None:
    """privacy.secureAggregation, a training attempt: the protocol objects of the round this site
    reads (the aggregator's) and writes (its own); None otherwise."""
    if action.mode != "train" or spec.privacy.secure_aggregation is None:
        return None

    def key(kind: str, site: str | None = None) -> str:
        return layout.secagg(action.round, kind, site)

    return SecureAggregationUrls(
        advert_put_url=signer.presign_put(key("advert", action.site), expires),
        roster_get_url=signer.presign_get(key("roster"), expires),
        shares_put_url=signer.presign_put(key("shares", action.site), expires),
        inbox_get_url=signer.presign_get(key("inbox", action.site), expires),
        request_get_url=signer.presign_get(key("request"), expires),
        reveal_put_url=signer.presign_put(key("reveal", action.site), expires),
        sites=max(2, len(spec.sites)),
        weighting=spec.aggregation.weighting,
    )


def _swag_models(
    spec: FederatedTrainingSpec, layout: TrainingLayout, action: StartSiteJob
) -> tuple[str | None, str | None]:
    """evaluation.uncertainty swag: the key a training attempt of the window writes its moments to,
    and the key of the combined moments the final evaluation scores (the last training round's)."""
    uncertainty, rounds = spec.evaluation.uncertainty, spec.training.rounds
    if action.mode == "train":
        collects = uncertainty.collects_swag(action.round, rounds)
        return (layout.site_swag(action.round, action.site) if collects else None), None
    if uncertainty.method is UncertaintyMethod.SWAG and action.round >= rounds:
        return None, layout.swag(rounds - 1)
    return None, None


def _cross_site_models(
    spec: FederatedTrainingSpec, layout: TrainingLayout, action: StartSiteJob
) -> dict[str, str]:
    """evaluation.crossSite, the final evaluation: the key of each site's local model after the last
    training round (the round before the evaluation), whatever site scores them. Models only."""
    if action.mode != "evaluate" or not spec.evaluation.cross_site or action.round == 0:
        return {}
    return {site.name: layout.local_model(action.round - 1, site.name) for site in spec.sites}


def _sealing(
    data_key: DataKey,
    spec: FederatedTrainingSpec,
    layout: TrainingLayout,
    action: StartSiteJob,
    job: TrainerJob,
) -> Sealing:
    """privacy.encryptAtRest: the data key, and the store key behind each of the job's URLs (except
    the user's pretrained weights): the identity each object is sealed as."""
    keys = {
        "global_model_url": layout.global_model(action.round),
        "update_url": layout.update(action.round, action.site),
        "state_put_url": layout.site_state(action.site, action.round, action.attempt),
        "site_model_url": layout.site_merged_model(action.site),
        "control_url": layout.server_control(action.round),
    }
    swag_put, swag_get = _swag_models(spec, layout, action)
    keys.update(
        {field: key for field, key in (("swag_put_url", swag_put), ("swag_get_url", swag_get)) if key}
    )
    if action.state_from is not None:
        keys["state_get_url"] = layout.site_state(
            action.site, action.state_from.round, action.state_from.attempt
        )
    present = {field: key for field, key in keys.items() if getattr(job, field) is not None}
    for site, key in _cross_site_models(spec, layout, action).items():
        present[f"{CROSS_SITE_FIELD}.{site}"] = key
    return Sealing(data_key=data_key.to_base64(), object_keys=present)


# --------------------------------------------------------------------------------------------------
# the per-round memory


@dataclass
class RoundMemory:
    """What the actions answered, about the current round: what the engine observes next.

    Verdicts and the manifest belong to one round; moving to another round forgets them.
    """

    round: int = -1
    initial_model_uri: str | None = None
    merged: ModelReply | None = None
    verdicts: dict[str, UpdateVerdict] = field(default_factory=dict)
    manifest: RoundManifest | None = None
    failure: Failure | None = None
    waiting_for: str | None = None
    waiting_reason: str | None = None  # the kind of the wait, where the error names one
    retry_seconds: float | None = None  # the shortest delay the temporary errors of a pass asked for
    poll_seconds: float | None = None  # a secure-aggregation phase waits for the sites: step again soon

    def observations(
        self, status: FederatedTrainingStatus, jobs: Mapping[JobKey, JobObservation]
    ) -> Observations:
        if self.round != status.round:
            self.round = status.round
            self.verdicts = {}
        manifest = self.manifest if self.manifest and self.manifest.round == status.round else None
        return Observations(
            initial_model_uri=self.initial_model_uri,
            jobs=dict(jobs),
            verdicts=dict(self.verdicts),
            manifest=manifest,
            merged_model_uri=self.merged.model_uri if self.merged else None,
            best_merged_model_uri=self.merged.best_model_uri if self.merged else None,
            swag_model_uri=self.merged.swag_model_uri if self.merged else None,
            failure=self.failure,
            waiting_for=self.waiting_for,
            waiting_reason=self.waiting_reason,
        )

    def waiting(self, error: TemporaryError) -> None:
        self.waiting_for = str(error)
        reason = getattr(error, "reason", None)
        self.waiting_reason = reason if isinstance(reason, str) else None
        self.retry_seconds = (
            error.delay if self.retry_seconds is None else min(self.retry_seconds, error.delay)
        )

    def failed(self, error: PermanentError) -> None:
        self.failure = Failure(reason=error.reason, message=str(error))


def unexpected_error(doing: str, error: Exception) -> PermanentError:
    """An error no code classified: the training fails with it named, once, instead of a silent loop."""
    return PermanentError(
        f"{doing} failed with an unexpected {type(error).__name__}: {error} "
        "(the operator's log has the traceback)",
        reason="OperatorError",
    )


# --------------------------------------------------------------------------------------------------
# stepping and acting


@dataclass(frozen=True)
class StepRecord:
    """One engine step of a pass: the status before and after, and the verdicts it saw."""

    before: FederatedTrainingStatus
    after: FederatedTrainingStatus
    verdicts: Mapping[str, UpdateVerdict]


@dataclass
class Pass:
    """What one pass of the core did: the status to save, the events to post once it is saved."""

    status: FederatedTrainingStatus
    events: list[Event] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    progressed: bool = False  # the last step's actions left something to step on at once
    waiting_for: str | None = None
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    #: Step again within this many seconds even if nothing wakes the driver: a secure-aggregation
    #: phase waits for the sites' objects in the store, which no Job event announces.
    poll_seconds: float | None = None


class DriverCore:
    """The engine, its memory and the action dispatch, over a driver's ports."""

    def __init__(
        self,
        spec: FederatedTrainingSpec,
        layout: TrainingLayout,
        *,
        jobs: JobPort,
        aggregator: AggregatorPort,
        credentials: CredentialsPort,
        history: HistoryPort,
        url_grace_seconds: int,
        memory: RoundMemory | None = None,
        on_action: Callable[[Action, object], None] | None = None,
    ) -> None:
        self.spec = spec
        self.layout = layout
        self.jobs = jobs
        self.aggregator = aggregator
        self.credentials = credentials
        self.history = history
        self.url_grace_seconds = url_grace_seconds
        self.on_action = on_action or (lambda action, result: None)
        self.memory = memory if memory is not None else RoundMemory()

    async def advance(self, status: FederatedTrainingStatus, clock: Callable[[], datetime]) -> Pass:
        """Step the engine and act, again while the actions answer at once (at most MAX_STEPS_PER_PASS)."""
        outcome = Pass(status=status)
        for _ in range(MAX_STEPS_PER_PASS):
            current = outcome.status
            observations = self.memory.observations(current, self.jobs.observe(current.round))
            decision = step(self.spec, current, observations, clock())
            outcome.progressed = await self.act(decision.status, decision.actions)
            outcome.steps.append(StepRecord(current, decision.status, observations.verdicts))
            outcome.events += decision.events
            outcome.status = decision.status
            if not outcome.progressed or outcome.status.phase.finished:
                break
        outcome.waiting_for = self.memory.waiting_for
        outcome.retry_seconds = self.memory.retry_seconds or DEFAULT_RETRY_SECONDS
        outcome.poll_seconds = self.memory.poll_seconds
        return outcome

    async def act(self, status: FederatedTrainingStatus, actions: Sequence[Action]) -> bool:
        """Carry out a step's actions; True if a result is there to use at once (step again now)."""
        self.memory.waiting_for = None
        self.memory.waiting_reason = None
        self.memory.retry_seconds = None
        self.memory.poll_seconds = None
        progressed = False
        independent = [action for action in actions if isinstance(action, INDEPENDENT_ACTIONS)]
        for action in actions:
            if not isinstance(action, INDEPENDENT_ACTIONS):
                progressed |= await self._guarded(status, action)
        results = await asyncio.gather(*(self._guarded(status, action) for action in independent))
        return progressed or any(results)

    async def _guarded(self, status: FederatedTrainingStatus, action: Action) -> bool:
        """One action; every error it meets was classified where it was raised."""
        try:
            result = await self._execute(status, action)
        except TemporaryError as error:
            log.info("%s: waiting: %s", self.layout.root, error)
            self.memory.waiting(error)
            return False
        except PermanentError as error:
            self.memory.failed(error)
            return True
        except Exception as error:  # a bug: retrying the same action would meet it again
            log.exception("%s: %s failed unexpectedly", self.layout.root, type(action).__name__)
            self.memory.failed(unexpected_error(type(action).__name__, error))
            return True
        self.on_action(action, result)
        return yields_at_once(action)

    async def _execute(self, status: FederatedTrainingStatus, action: Action) -> object:
        memory, aggregator = self.memory, self.aggregator
        if isinstance(action, InitializeModel):
            memory.initial_model_uri = await aggregator.initialize()
            return memory.initial_model_uri
        if isinstance(action, SubmitUpdate):
            verdict = await aggregator.submit(action.round, action.site)
            memory.verdicts[action.site] = verdict
            return verdict
        if isinstance(action, CloseRound):
            memory.manifest = await aggregator.close(
                action.round, list(action.participants), list(action.rejected)
            )
            return memory.manifest
        if isinstance(action, AdvanceSecureAggregation):
            return await self._advance_secure(action)
        if isinstance(action, MergeFinalModel):
            memory.merged = await aggregator.merge(action.round, action.best_round)
            return memory.merged
        if isinstance(action, ApplyRetention):
            return await self._apply_retention(action)
        if isinstance(action, StartSiteJob):
            await self.jobs.start(action, await self.trainer_job(action, status))
        elif isinstance(action, StopSiteJob):
            await self.jobs.stop(action)
        elif isinstance(action, RecordRound):
            await self.history.record(action.record, status)
        elif isinstance(action, ReleaseAggregator):
            await aggregator.release()
        return None

    async def _apply_retention(self, action: ApplyRetention) -> int:
        """storage.retention is best effort: a deletion that fails is logged and the training goes on
        (the objects stay; the engine does not ask again)."""
        try:
            return await self.aggregator.apply_retention(action.round, action.updates, list(action.models))
        except Exception as error:
            log.warning("%s: round %d: storage.retention failed: %s", self.layout.root, action.round, error)
            return 0

    async def _advance_secure(self, action: AdvanceSecureAggregation) -> SecureAggregationReply:
        """The aggregator ends a secure-aggregation phase if it may; while the round waits for the
        sites' objects the driver steps again soon (no Job event announces an object)."""
        reply = await self.aggregator.advance_secure(
            action.round, list(action.live), action.started_at, action.now
        )
        if reply.phase in SECURE_WAITING_PHASES:
            self.memory.poll_seconds = SECURE_POLL_SECONDS
        if reply.waiting_on:
            log.info(
                "%s: round %d secure aggregation, %s phase: waiting for %s",
                self.layout.root,
                action.round,
                reply.phase,
                ", ".join(reply.waiting_on),
            )
        return reply

    async def trainer_job(self, action: StartSiteJob, status: FederatedTrainingStatus) -> TrainerJob:
        expiry = url_expiry_seconds(self.spec, self.url_grace_seconds)
        signer = await self.credentials.signer()
        pretrained_url = await self.credentials.pretrained_url(expiry)
        # Transfers may ride out an object-store outage until the round's deadline: past it the site
        # is a straggler anyway.
        data_key = await self.credentials.data_key()
        return build_trainer_job(
            self.spec, self.layout, action, signer, expiry, pretrained_url, status.round_deadline, data_key
        )
