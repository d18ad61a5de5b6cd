"""The Kubernetes driver of the round engine: observe Jobs and the aggregator, step, act, write status.

One `TrainingRuntime` per FederatedTraining holds what the operator learnt since it started (the
aggregator's verdicts and replies, the status it last wrote). None of it needs to survive a restart:
the status in the resource is where the engine resumes from, and every action is idempotent (Job
names, object keys, and the aggregator's submit and close all give the recorded result again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic import ValidationError

from fedtrain.api import (
    ConditionType,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    RoundRecord,
    StorageSpec,
    describe_errors,
)
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.messages import RoundManifest, UpdateVerdict
from fedtrain.store import S3Store

from . import manifests
from .aggregator_client import AggregatorClient, AggregatorRefusedError, AggregatorUnavailableError
from .engine import (
    Action,
    CloseRound,
    Event,
    InitializeModel,
    JobObservation,
    JobState,
    MergeFinalModel,
    Observations,
    RecordRound,
    StartSiteJob,
    StopSiteJob,
    SubmitUpdate,
    set_condition,
    step,
)
from .history import append_record
from .kube import Kube, merge_patch
from .manifests import PodDefaults, TrainingRef
from .metrics import OperatorMetrics
from .settings import OperatorSettings

log = logging.getLogger(__name__)

#: How soon to look again when the aggregator is not reachable yet (a pod starting, an image pull).
AGGREGATOR_RETRY_SECONDS = 2.0
WAITING = " (waiting: "
INDEPENDENT_ACTIONS = (StartSiteJob, StopSiteJob, SubmitUpdate, RecordRound)
#: Engine steps chained in one reconcile (one status write): submit, close, start the next round,
#: with room to spare; a longer chain goes on in the next reconcile.
MAX_STEPS_PER_RECONCILE = 8


# --------------------------------------------------------------------------------------------------
# Jobs, as the watch reports them


def job_observation(job: Mapping[str, Any]) -> JobObservation:
    """A Job's state as the engine sees it, from its status conditions and counters."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions or status.get("succeeded"):
        return JobObservation(JobState.SUCCEEDED)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        reason = failed.get("reason") or "Failed"
        return JobObservation(JobState.FAILED, f"{reason}: {failed.get('message') or 'the trainer failed'}")
    return JobObservation(JobState.ACTIVE)


JobKey = tuple[str, int, int]  # site, round, attempt


@dataclass
class JobTable:
    """Every trainer Job of every training, kept current by the Job watch."""

    by_training: dict[str, dict[JobKey, JobObservation]] = field(default_factory=dict)

    def update(self, job: Mapping[str, Any], deleted: bool) -> str | None:
        """Record a watch event; returns the training uid it belongs to, if it is one of ours."""
        labels = (job.get("metadata") or {}).get("labels") or {}
        uid: str | None = labels.get(manifests.TRAINING_UID)
        try:
            key = (labels[manifests.SITE], int(labels[manifests.ROUND]), int(labels[manifests.ATTEMPT]))
        except (KeyError, ValueError):
            return None
        if uid is None:
            return None
        jobs = self.by_training.setdefault(uid, {})
        if deleted:
            jobs.pop(key, None)
        else:
            jobs[key] = job_observation(job)
        return uid

    def assume_active(self, uid: str, key: JobKey) -> None:
        """A Job just created (or found existing) counts as active until its watch event arrives."""
        self.by_training.setdefault(uid, {}).setdefault(key, JobObservation(JobState.ACTIVE))

    def round_view(self, uid: str, round_index: int) -> dict[tuple[str, int], JobObservation]:
        jobs = self.by_training.get(uid, {})
        return {(site, attempt): seen for (site, r, attempt), seen in jobs.items() if r == round_index}

    def forget(self, uid: str) -> None:
        self.by_training.pop(uid, None)


# --------------------------------------------------------------------------------------------------
# one training


@dataclass
class TrainingRuntime:
    ref: TrainingRef
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    status: FederatedTrainingStatus | None = None  # as last written by this operator
    written: dict[str, Any] | None = None  # the same, as sent to the API server
    spec_seen: str | None = None
    aggregator_config: str | None = None  # the spec the aggregator objects were last applied for
    token: str | None = None
    store: S3Store | None = None
    keys: tuple[str | None, str | None] = (None, None)  # of spec.storage.credentialsSecret
    verdicts_round: int = -1
    verdicts: dict[str, UpdateVerdict] = field(default_factory=dict)
    manifest: RoundManifest | None = None
    initial_model_uri: str | None = None
    merged_model_uri: str | None = None
    aggregator_error: str | None = None
    waiting_for: str | None = None  # why the last reconcile could not act (aggregator not ready, ...)
    invalid: str | None = None
    deleting: bool = False  # set by the delete handler: no reconcile may act any more
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reconcile (or clean-up) at a time


@dataclass
class Context:
    """What every handler shares: settings, API clients, the Job table and the runtimes."""

    settings: OperatorSettings
    kube: Kube
    session: aiohttp.ClientSession
    jobs: JobTable = field(default_factory=JobTable)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    runtimes: dict[str, TrainingRuntime] = field(default_factory=dict)
    # A boto3 client costs ~12 MB: trainings that share a bucket and keys share one store.
    stores: dict[tuple[str | None, ...], S3Store] = field(default_factory=dict)
    stores_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def store(self, storage: StorageSpec, access_key: str | None, secret_key: str | None) -> S3Store:
        key = (storage.bucket, storage.prefix, storage.endpoint, storage.region, access_key, secret_key)
        async with self.stores_lock:
            if key not in self.stores:
                self.stores[key] = await asyncio.to_thread(S3Store.from_spec, storage, access_key, secret_key)
            return self.stores[key]

    @property
    def pod_defaults(self) -> PodDefaults:
        settings = self.settings
        return PodDefaults(
            trainer_image=settings.trainer_image,
            aggregator_image=settings.aggregator_image,
            image_pull_policy=settings.image_pull_policy,
            job_grace_seconds=settings.job_grace_seconds,
            job_ttl_seconds=settings.job_ttl_seconds,
            aggregator_resources=settings.aggregator_resources,
            image_pull_secrets=tuple(settings.image_pull_secrets),
        )

    def runtime(self, ref: TrainingRef) -> TrainingRuntime:
        if ref.uid not in self.runtimes:
            self.runtimes[ref.uid] = TrainingRuntime(ref)
        return self.runtimes[ref.uid]

    def wake(self, uid: str) -> None:
        runtime = self.runtimes.get(uid)
        if runtime is not None:
            runtime.wake.set()


def training_ref(body: Mapping[str, Any]) -> TrainingRef:
    metadata = body["metadata"]
    return TrainingRef(namespace=metadata["namespace"], name=metadata["name"], uid=metadata["uid"])


@dataclass
class Outcome:
    """What one reconcile did: when to look again, and the events to post once the status is saved."""

    delay: float | None  # seconds; None: only a Job or spec change wakes it (a finished training)
    events: list[Event]


class Reconciler:
    """One reconcile of one training: validate, make sure the aggregator exists, step the engine, act."""

    def __init__(self, context: Context, body: Mapping[str, Any]) -> None:
        self.context = context
        self.kube = context.kube
        self.settings = context.settings
        self.body = body
        self.ref = training_ref(body)
        self.runtime = context.runtime(self.ref)

    # ---------------------------------------------------------------------------------------------

    def _current_status(self) -> FederatedTrainingStatus:
        """The status this operator last wrote, or after a restart the one in the resource."""
        if self.runtime.status is not None:
            return self.runtime.status
        raw = self.body.get("status") or {}
        try:
            status = FederatedTrainingStatus.model_validate(raw)
        except ValidationError as error:
            # Only someone editing the status by hand gets here; the rounds in the bucket are kept,
            # so starting from a fresh status repeats work but loses none.
            log.warning(
                "%s/%s: unreadable status (%s); starting afresh", self.ref.namespace, self.ref.name, error
            )
            status = FederatedTrainingStatus()
        self.runtime.status = status
        self.runtime.written = raw
        return status

    async def reconcile(self) -> Outcome:
        now = datetime.now(UTC)
        status = self._current_status()
        try:
            spec = FederatedTrainingSpec.model_validate(self.body.get("spec") or {})
            if spec.storage is None:
                raise _InvalidSpecError(
                    "spec.storage: required on a cluster (weights move only through object storage): "
                    "set storage.bucket, and storage.endpoint for MinIO or Ceph"
                )
        except ValidationError as error:
            return await self._invalid(status, "; ".join(describe_errors(error)), now)
        except _InvalidSpecError as error:
            return await self._invalid(status, str(error), now)

        events: list[Event] = []
        if self.runtime.invalid is not None or _condition_true(status, ConditionType.INVALID):
            status = status.model_copy(deep=True)
            set_condition(status, ConditionType.INVALID, False, "Valid", "the spec is valid", now)
            self.runtime.invalid = None
            events.append(Event("Normal", "SpecValid", "the spec is valid again"))

        if not status.phase.finished:
            await self._ensure_aggregator(spec)

        # What an aggregator call answers (verdicts, a closed round, a model) lets the engine take its
        # next step at once: a round ends and the next one's Jobs start in one reconcile and one status
        # write. A step whose actions need the cluster to answer (Jobs to run) ends the chain.
        steps: list[tuple[FederatedTrainingStatus, FederatedTrainingStatus, Mapping[str, UpdateVerdict]]] = []
        current, progressed = status, False
        for _ in range(MAX_STEPS_PER_RECONCILE):
            observations = self._observe(current)
            decision = step(spec, current, observations, datetime.now(UTC))
            self.runtime.waiting_for = None
            progressed = await self._act(spec, decision.actions)
            steps.append((current, decision.status, observations.verdicts))
            events += decision.events
            current = decision.status
            if not progressed or current.phase.finished:
                break
        new_status = current
        if not new_status.phase.finished:
            base = (new_status.message or "").split(WAITING)[0]
            waiting = f"{WAITING}{self.runtime.waiting_for})" if self.runtime.waiting_for else ""
            new_status.message = f"{base}{waiting}" or None
        if new_status.phase.finished and not status.phase.finished:
            await self._scale_aggregator(0)
        saved = await self._write_status(new_status)
        if not saved:
            return Outcome(delay=None, events=[])
        for before, after, verdicts in steps:
            self.context.metrics.status_written(self.ref, spec.training.rounds, before, after, verdicts)
        return Outcome(delay=self._next_delay(new_status, progressed, datetime.now(UTC)), events=events)

    async def _act(self, spec: FederatedTrainingSpec, actions: Sequence[Action]) -> bool:
        """Carry out a step's actions; True if a result is there to use at once (step again now).

        Actions on different sites (and the history record) are independent: all at once, after the
        aggregator's own calls (initialize, close, merge), which are done in order.
        """
        progressed = False
        independent = [a for a in actions if isinstance(a, INDEPENDENT_ACTIONS)]
        for action in actions:
            if not isinstance(action, INDEPENDENT_ACTIONS):
                progressed |= await self._timed(spec, action)
        progressed |= any(await asyncio.gather(*(self._timed(spec, action) for action in independent)))
        return progressed

    def _next_delay(self, status: FederatedTrainingStatus, progressed: bool, now: datetime) -> float | None:
        if status.phase.finished:
            return None
        if progressed:
            return 0
        if self.runtime.waiting_for:
            return AGGREGATOR_RETRY_SECONDS
        delay = self.settings.resync_seconds
        if status.round_deadline is not None:
            delay = min(delay, max(0.05, (status.round_deadline - now).total_seconds() + 0.05))
        return delay

    async def _invalid(self, status: FederatedTrainingStatus, message: str, now: datetime) -> Outcome:
        """An invalid spec: an Invalid condition and an event, and nothing else happens."""
        new_status = status.model_copy(deep=True)
        set_condition(new_status, ConditionType.INVALID, True, "InvalidSpec", message, now)
        set_condition(new_status, ConditionType.READY, False, "InvalidSpec", message, now)
        new_status.message = f"invalid spec: {message}"
        events = [] if self.runtime.invalid == message else [Event("Warning", "InvalidSpec", message)]
        self.runtime.invalid = message
        if await self._write_status(new_status):
            self.context.metrics.status_written(self.ref, None, status, new_status, {})
        return Outcome(delay=self.settings.resync_seconds, events=events)

    # ---------------------------------------------------------------------------------------------
    # observations

    def _observe(self, status: FederatedTrainingStatus) -> Observations:
        runtime = self.runtime
        if runtime.verdicts_round != status.round:
            runtime.verdicts_round = status.round
            runtime.verdicts = {}
        manifest = runtime.manifest if runtime.manifest and runtime.manifest.round == status.round else None
        return Observations(
            initial_model_uri=runtime.initial_model_uri,
            jobs=self.context.jobs.round_view(self.ref.uid, status.round),
            verdicts=dict(runtime.verdicts),
            manifest=manifest,
            merged_model_uri=runtime.merged_model_uri,
            aggregator_error=runtime.aggregator_error,
        )

    # ---------------------------------------------------------------------------------------------
    # the aggregator's objects and client

    async def _ensure_aggregator(self, spec: FederatedTrainingSpec) -> None:
        runtime = self.runtime
        if runtime.token is None:
            name = manifests.token_secret_name(self.ref)
            existing = await self.kube.secret_data(self.ref.namespace, name)
            token = (existing or {}).get(manifests.TOKEN_KEY)
            if not token:
                token = secrets.token_urlsafe(32)
                created = await self.kube.create(manifests.token_secret(self.ref, token))
                if created is None:  # another reconcile made it between the read and the create
                    token = (await self.kube.secret_data(self.ref.namespace, name) or {})[manifests.TOKEN_KEY]
            runtime.token = token
        config = json.dumps(spec.to_api(), sort_keys=True)
        if runtime.aggregator_config != config:
            defaults = self.context.pod_defaults
            await self.kube.apply(manifests.aggregator_config_map(self.ref, spec))
            await self.kube.apply(manifests.aggregator_deployment(self.ref, spec, defaults))
            await self.kube.apply(manifests.aggregator_service(self.ref))
            runtime.aggregator_config = config
            runtime.store = None  # the storage spec may have changed with it

    async def _scale_aggregator(self, replicas: int) -> None:
        name = manifests.aggregator_name(self.ref)
        await self.kube.patch("Deployment", self.ref.namespace, name, {"spec": {"replicas": replicas}})

    def _client(self) -> AggregatorClient:
        url = self.settings.aggregator_base_url(
            self.ref.namespace, manifests.aggregator_name(self.ref), manifests.AGGREGATOR_PORT
        )
        return AggregatorClient(
            self.context.session, url, self.runtime.token or "", self.settings.aggregator_timeout_seconds
        )

    async def _store(self, spec: FederatedTrainingSpec) -> S3Store:
        """The training's bucket, with the keys of its credentialsSecret (for presigning and history)."""
        if self.runtime.store is None:
            storage = spec.storage
            if storage is None:  # checked before any action
                raise _InvalidSpecError("spec.storage is required")
            access_key = secret_key = None
            if storage.credentials_secret:
                keys = await self.kube.secret_data(self.ref.namespace, storage.credentials_secret)
                if keys is None:
                    secret = f"{self.ref.namespace}/{storage.credentials_secret}"
                    raise _WaitingError(f"Secret {secret} (spec.storage.credentialsSecret) does not exist")
                access_key, secret_key = keys.get("AWS_ACCESS_KEY_ID"), keys.get("AWS_SECRET_ACCESS_KEY")
            self.runtime.keys = (access_key, secret_key)
            self.runtime.store = await self.context.store(storage, access_key, secret_key)
        return self.runtime.store

    # ---------------------------------------------------------------------------------------------
    # actions

    async def _timed(self, spec: FederatedTrainingSpec, action: Action) -> bool:
        started = time.perf_counter()
        progressed = await self._execute(spec, action)
        elapsed = time.perf_counter() - started
        log.debug("%s/%s: %s in %.3f s", self.ref.namespace, self.ref.name, type(action).__name__, elapsed)
        return progressed

    async def _execute(self, spec: FederatedTrainingSpec, action: Action) -> bool:
        """Carry out one action; True if its result is there to use at once (step again now)."""
        runtime = self.runtime
        try:
            if isinstance(action, InitializeModel):
                runtime.initial_model_uri = await self._client().initialize()
                return True
            if isinstance(action, StartSiteJob):
                await self._start_job(spec, action)
            elif isinstance(action, StopSiteJob):
                await self._stop_job(spec, action)
            elif isinstance(action, SubmitUpdate):
                verdict = await self._client().submit(action.round, action.site)
                runtime.verdicts[action.site] = verdict
                self.context.metrics.verdict(self.ref, verdict)
                return True
            elif isinstance(action, CloseRound):
                runtime.manifest = await self._client().close(
                    action.round, list(action.participants), list(action.rejected)
                )
                return True
            elif isinstance(action, MergeFinalModel):
                runtime.merged_model_uri = await self._client().merge(action.round)
                return True
            elif isinstance(action, RecordRound):
                await self._record(spec, action.record)
                self.context.metrics.round_recorded(self.ref, action.record)
        except AggregatorRefusedError as error:
            runtime.aggregator_error = str(error)
            return True
        except (AggregatorUnavailableError, _WaitingError) as error:
            log.info("%s/%s: waiting: %s", self.ref.namespace, self.ref.name, error)
            runtime.waiting_for = str(error)
        return False

    async def _start_job(self, spec: FederatedTrainingSpec, action: StartSiteJob) -> None:
        site = spec.site(action.site)
        store = await self._store(spec)
        layout = TrainingLayout(self.ref.namespace, self.ref.name)
        expiry = self.settings.presign_seconds(spec.aggregation.round_timeout_seconds)
        # Exactly what this attempt may touch, for as long as the round may last: no bucket keys.
        # An evaluation neither reads nor writes the site's optimizer state.
        training = action.mode == "train"
        state_key = layout.site_state(action.site)
        trainer_job = TrainerJob(
            training=self.ref.name,
            round=action.round,
            site=action.site,
            attempt=action.attempt,
            mode=action.mode,
            spec=TrainerSpec.for_site(spec, action.site),
            global_model_url=store.presign_get(layout.global_model(action.round), expiry),
            update_url=store.presign_put(layout.update(action.round, action.site), expiry),
            state_get_url=store.presign_get(state_key, expiry) if training else None,
            state_put_url=store.presign_put(state_key, expiry) if training else None,
            pretrained_url=await self._pretrained_url(spec, expiry),
        )
        config = trainer_job.model_dump(mode="json", by_alias=True, exclude_none=True)
        job = manifests.trainer_job(
            self.ref, spec, site, action.round, action.attempt, action.mode, self.context.pod_defaults
        )
        # The Job first, then its Secret owned by it (two calls, not three). Its pod waits for the
        # Secret volume, which follows within milliseconds; a Job that exists already (a restart
        # between the two calls) is read back so that its Secret can be made.
        name = job["metadata"]["name"]
        created = await self.kube.create(job) or await self.kube.read("Job", site.namespace, name)
        self.context.jobs.assume_active(self.ref.uid, (action.site, action.round, action.attempt))
        if created is None:  # deleted again at once (a suspend): nothing to hand the URLs to
            return
        await self.kube.create(
            manifests.trainer_secret(self.ref, site, action.round, action.attempt, config, created)
        )

    async def _pretrained_url(self, spec: FederatedTrainingSpec, expiry: int) -> str | None:
        pretrained = spec.model.pretrained
        if pretrained.source.value != "uri" or not pretrained.location or spec.storage is None:
            return None
        bucket, _, key = pretrained.location.removeprefix("s3://").partition("/")
        # The base weights' bucket, reached with the training's endpoint and keys.
        await self._store(spec)
        source = spec.storage.model_copy(update={"bucket": bucket, "prefix": ""})
        store = await self.context.store(source, *self.runtime.keys)
        return store.presign_get(key, expiry)

    async def _stop_job(self, spec: FederatedTrainingSpec, action: StopSiteJob) -> None:
        namespace = spec.site(action.site).namespace
        name = manifests.job_name(self.ref, action.site, action.round, action.attempt)
        await self.kube.delete("Job", namespace, name)
        await self.kube.delete("Secret", namespace, name)

    async def _record(self, spec: FederatedTrainingSpec, record: RoundRecord) -> None:
        """Append a closed round to the full history in the bucket (the status keeps the last few)."""
        store = await self._store(spec)
        key = TrainingLayout(self.ref.namespace, self.ref.name).history()
        await asyncio.to_thread(append_record, store, key, record)

    # ---------------------------------------------------------------------------------------------
    # status

    async def _write_status(self, status: FederatedTrainingStatus) -> bool:
        """One merge patch per reconcile, only of what changed; False if the training is gone."""
        generation = (self.body.get("metadata") or {}).get("generation")
        if generation is not None:
            status.observed_generation = int(generation)
        document = status.to_api()
        previous = self.runtime.written or {}
        patch = merge_patch(previous, document)
        if patch and not await self.kube.patch_training_status(self.ref.namespace, self.ref.name, patch):
            return False
        self.runtime.status = status
        self.runtime.written = document
        return True


class _InvalidSpecError(ValueError):
    pass


class _WaitingError(RuntimeError):
    pass


def _condition_true(status: FederatedTrainingStatus, kind: ConditionType) -> bool:
    return any(c.type is kind and c.status == "True" for c in status.conditions)
