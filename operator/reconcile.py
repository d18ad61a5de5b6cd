"""The Kubernetes driver of the round engine: one reconcile of one training.

A reconcile validates the spec, makes sure the aggregator exists, lets the driver core step the
engine and act through the cluster's ports (Jobs, the aggregator's HTTP API, the training's store
credentials), and writes the status once. One `TrainingRuntime` per FederatedTraining holds what the
operator learnt since it started; none of it needs to survive a restart: the status in the resource
is where the engine resumes from, and every action is idempotent.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from fedtrain.api import (
    ConditionType,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    RejectedUpdate,
    StorageSpec,
    describe_errors,
    name_problems,
)
from fedtrain.errors import INVALID_SPEC, PermanentError, TemporaryError
from fedtrain.layout import TrainingLayout
from fedtrain.messages import ModelReply, RoundManifest, SecureAggregationReply, UpdateVerdict
from fedtrain.pretrained import cluster_problems
from fedtrain.store import S3Store

from . import manifests
from .admission import trainer_job_problems
from .aggregator_client import AggregatorClient, AggregatorUnavailableError
from .core import DriverCore, Pass, RoundMemory, unexpected_error
from .credentials import KubeCredentials
from .engine import Action, Event, RecordRound, SubmitUpdate, set_condition
from .history import StoreHistory
from .jobs import JobTable, KubeJobs
from .kube import Kube
from .manifests import PodDefaults, TrainingRef
from .metrics import OperatorMetrics
from .provisioning import Provisioner, ReadinessProbe
from .settings import OperatorSettings
from .status_writer import StatusWriter

T = TypeVar("T")

log = logging.getLogger(__name__)

#: How long the operator waits for a pod's /readyz when asking why it is not ready.
READINESS_TIMEOUT_SECONDS = 3.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class TrainingRuntime:
    """What the operator keeps of one training between reconciles."""

    ref: TrainingRef
    writer: StatusWriter
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    memory: RoundMemory = field(default_factory=RoundMemory)
    spec_seen: str | None = None
    applied: str | None = None  # the spec the aggregator objects were last applied for
    credentials: KubeCredentials | None = None  # of the applied spec
    token: str | None = None
    invalid: str | None = None
    deleting: bool = False  # set by the delete handler: no reconcile may act any more
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reconcile (or clean-up) at a time
    last_error: str | None = None  # of the last reconcile that raised: a repeat is not logged again
    error_delay: float = 0.0  # before the next reconcile after one that raised


@dataclass
class Context:
    """What every handler shares: settings, API clients, the Job table and the runtimes."""

    settings: OperatorSettings
    kube: Kube
    session: aiohttp.ClientSession
    jobs: JobTable = field(default_factory=JobTable)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    runtimes: dict[str, TrainingRuntime] = field(default_factory=dict)
    clock: Callable[[], datetime] = _utc_now  # tests move time on to reach a deadline
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
            self.runtimes[ref.uid] = TrainingRuntime(ref, StatusWriter(self.kube, ref))
        return self.runtimes[ref.uid]

    def wake(self, uid: str) -> None:
        runtime = self.runtimes.get(uid)
        if runtime is not None:
            runtime.wake.set()


def training_ref(body: Mapping[str, Any]) -> TrainingRef:
    metadata = body["metadata"]
    return TrainingRef(namespace=metadata["namespace"], name=metadata["name"], uid=metadata["uid"])


def validate_spec(body: Mapping[str, Any]) -> FederatedTrainingSpec | str:
    """The spec as the engine needs it on a cluster, or what is wrong with it (naming the fields):
    metadata.name, the spec (camelCase only, strict), what a cluster needs, and the trainer Jobs it
    makes, checked against the Kubernetes schema."""
    metadata = body.get("metadata") or {}
    problems = name_problems(metadata.get("name"))
    try:
        spec = FederatedTrainingSpec.parse(body.get("spec") or {})
    except ValidationError as error:
        return "; ".join([*problems, *describe_errors(error, "spec")])
    problems += cluster_problems(spec)
    # An invalid name makes invalid labels: the Jobs are then checked as those of a valid one.
    name = "check" if problems else str(metadata["name"])
    problems += trainer_job_problems(spec, name, metadata.get("namespace") or "default")
    return "; ".join(problems) if problems else spec


def unserved_site_namespaces(spec: FederatedTrainingSpec, served: Sequence[str]) -> str | None:
    """What is wrong with a spec whose sites run in namespaces this operator does not serve, or None.

    An operator that serves a list of namespaces holds Roles in those only: a Job elsewhere would be
    refused (403) on every try. Cluster-wide (`served` empty), every namespace is served.
    """
    if not served:
        return None
    problems = [
        f"spec.sites[{index}].namespace: {site.namespace!r} (site {site.name}) is not a namespace this "
        f"operator serves ({', '.join(served)})"
        for index, site in enumerate(spec.sites)
        if not _serves(served, site.namespace)
    ]
    if not problems:
        return None
    return (
        "; ".join(problems) + ": add it to the chart's siteNamespaces (FEDTRAIN_OPERATOR_NAMESPACES), "
        "or set spec.sites[].namespace to a served one"
    )


def _serves(served: Sequence[str], namespace: str) -> bool:
    """kopf's namespace patterns: names or globs, `!`-patterns exclude."""
    if any(pattern.startswith("!") and fnmatch.fnmatchcase(namespace, pattern[1:]) for pattern in served):
        return False
    return any(not pattern.startswith("!") and fnmatch.fnmatchcase(namespace, pattern) for pattern in served)


@dataclass
class Outcome:
    """What one reconcile did: when to look again, and the events to post once the status is saved."""

    delay: float | None  # seconds; None: only a Job or spec change wakes it (a finished training)
    events: list[Event]


class ClusterAggregator:
    """The `AggregatorPort` on a cluster: the aggregator's HTTP API, and its Deployment to release.

    A call that finds the aggregator unreachable or not ready says why, from its pods: a crash loop,
    a Secret missing, an image that cannot be pulled, or the store its /readyz cannot reach.
    """

    def __init__(
        self, client: AggregatorClient, provisioner: Provisioner, readiness: ReadinessProbe | None = None
    ) -> None:
        self.client = client
        self.provisioner = provisioner
        self.readiness = readiness

    async def _explained(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except AggregatorUnavailableError as error:
            cause = await self.provisioner.why_unavailable(self.readiness)
            if cause is None:
                raise
            raise AggregatorUnavailableError(f"{error}; the aggregator: {cause}", error.delay) from error

    async def initialize(self) -> str:
        return await self._explained(self.client.initialize())

    async def submit(self, round_index: int, site: str) -> UpdateVerdict:
        return await self._explained(self.client.submit(round_index, site))

    async def close(
        self, round_index: int, participants: list[str], rejected: list[RejectedUpdate]
    ) -> RoundManifest:
        return await self._explained(self.client.close(round_index, participants, rejected))

    async def advance_secure(
        self, round_index: int, live: list[str], started_at: datetime, now: datetime
    ) -> SecureAggregationReply:
        return await self._explained(self.client.advance_secure(round_index, live, started_at, now))

    async def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int:
        return await self._explained(self.client.apply_retention(round_index, updates, models))

    async def merge(self, round_index: int, best_round: int | None) -> ModelReply:
        return await self._explained(self.client.merge(round_index, best_round))

    async def release(self) -> None:
        """Scale the aggregator to zero: its objects stay (and go with the training)."""
        await self.provisioner.scale(0)


class Reconciler:
    """One reconcile of one training: validate, make sure the aggregator exists, advance, write status."""

    def __init__(self, context: Context, body: Mapping[str, Any]) -> None:
        self.context = context
        self.settings = context.settings
        self.body = body
        self.ref = training_ref(body)
        self.runtime = context.runtime(self.ref)
        self.provisioner = Provisioner(context.kube, self.ref, context.pod_defaults)

    @property
    def generation(self) -> int | None:
        """The spec generation this reconcile acts on, recorded as the status's observedGeneration."""
        generation = (self.body.get("metadata") or {}).get("generation")
        return None if generation is None else int(generation)

    async def reconcile(self) -> Outcome:
        now = self.context.clock()
        status = self.runtime.writer.current(self.body)
        spec = validate_spec(self.body)
        if not isinstance(spec, str):
            spec = unserved_site_namespaces(spec, self.settings.namespaces) or spec
        if isinstance(spec, str):
            return await self._invalid(status, spec, now)
        status, events = self._valid_again(status, now)
        if not status.phase.finished:
            try:
                await self._provision(spec)
            except TemporaryError as error:  # shown, and bounded, as any other wait
                self.runtime.memory.waiting(error)
            except PermanentError as error:  # an aggregator object the API server refuses
                self.runtime.memory.failed(error)
            except Exception as error:  # a spec the manifests cannot be built for: named, not looped
                log.exception("%s/%s: provisioning failed unexpectedly", self.ref.namespace, self.ref.name)
                self.runtime.memory.failed(unexpected_error("provisioning the aggregator", error))
        outcome = await self._core(spec).advance(status, self.context.clock)
        if not await self.runtime.writer.write(outcome.status, self.generation):
            return Outcome(delay=None, events=[])
        for done in outcome.steps:
            self.context.metrics.status_written(
                self.ref, spec.training.rounds, done.before, done.after, done.verdicts
            )
        return Outcome(delay=self._next_delay(outcome), events=events + outcome.events)

    def _valid_again(
        self, status: FederatedTrainingStatus, now: datetime
    ) -> tuple[FederatedTrainingStatus, list[Event]]:
        """Clear the Invalid condition of a spec that was invalid and is valid now.

        A training that failed for its spec (the aggregator found that it does not fit the model)
        keeps the condition: the spec passes the checks here, but the training is over because of it.
        """
        if self.runtime.invalid is None and not _condition_true(status, ConditionType.INVALID):
            return status, []
        if self.runtime.invalid is None and _failed_for_its_spec(status):
            return status, []
        status = status.model_copy(deep=True)
        set_condition(status, ConditionType.INVALID, False, "Valid", "the spec is valid", now)
        self.runtime.invalid = None
        return status, [Event("Normal", "SpecValid", "the spec is valid again")]

    async def _provision(self, spec: FederatedTrainingSpec) -> None:
        runtime = self.runtime
        runtime.token = await self.provisioner.token(runtime.token, spec)
        applied = await self.provisioner.apply(spec, runtime.applied)
        if applied != runtime.applied or runtime.credentials is None:
            # The storage spec may have changed with it: keys are read again.
            runtime.credentials = KubeCredentials(self.context.kube, self.ref, spec, self.context.store)
        runtime.applied = applied

    def _core(self, spec: FederatedTrainingSpec) -> DriverCore:
        context, runtime = self.context, self.runtime
        credentials = runtime.credentials or KubeCredentials(context.kube, self.ref, spec, context.store)
        url = self.settings.aggregator_base_url(
            self.ref.namespace, manifests.aggregator_name(self.ref), manifests.AGGREGATOR_PORT
        )
        client = AggregatorClient(
            context.session, url, runtime.token or "", self.settings.aggregator_timeout_seconds
        )
        layout = TrainingLayout(self.ref.namespace, self.ref.name)
        return DriverCore(
            spec,
            layout,
            jobs=KubeJobs(context.kube, context.jobs, self.ref, spec, context.pod_defaults),
            aggregator=ClusterAggregator(client, self.provisioner, self._readiness),
            credentials=credentials,
            history=StoreHistory(credentials.store, layout.history()),
            url_grace_seconds=self.settings.presign_grace_seconds,
            memory=runtime.memory,
            on_action=self._count,
        )

    async def _readiness(self, pod: str, ip: str) -> str | None:
        """Why a running aggregator pod is not ready, in its own words (its /readyz), or None."""
        url = self.settings.aggregator_pod_base_url(self.ref.namespace, pod, ip, manifests.AGGREGATOR_PORT)
        timeout = aiohttp.ClientTimeout(total=READINESS_TIMEOUT_SECONDS)
        try:
            async with self.context.session.get(f"{url}/readyz", timeout=timeout) as reply:
                if reply.status < 300:
                    return None
                text = (await reply.text())[:500]
        except (aiohttp.ClientError, TimeoutError) as error:
            return f"running, not ready; its /readyz did not answer ({type(error).__name__})"
        return f"running, not ready: {_problem_text(text)}"

    def _count(self, action: Action, result: object) -> None:
        metrics = self.context.metrics
        if isinstance(action, SubmitUpdate) and isinstance(result, UpdateVerdict):
            metrics.verdict(self.ref, result)
        elif isinstance(action, RecordRound):
            metrics.round_recorded(self.ref, action.record)

    def _next_delay(self, outcome: Pass) -> float | None:
        status = outcome.status
        if status.phase.finished:
            return None
        if outcome.progressed:
            return 0
        if outcome.waiting_for:
            return outcome.retry_seconds
        delay = self.settings.resync_seconds
        if outcome.poll_seconds is not None:
            delay = min(delay, outcome.poll_seconds)
        if status.round_deadline is not None:
            until = (status.round_deadline - self.context.clock()).total_seconds()
            delay = min(delay, max(0.05, until + 0.05))
        return delay

    async def report_unexpected(self, error: Exception) -> None:
        """A reconcile that failed with an error no code classified: say so in the status, once.

        The training goes on being retried (the error may pass: a bug met on one path only); the
        Ready condition names the error until a reconcile succeeds again.
        """
        status = self.runtime.writer.current(self.body).model_copy(deep=True)
        message = str(unexpected_error("reconciling", error))
        set_condition(status, ConditionType.READY, False, "OperatorError", message, self.context.clock())
        await self.runtime.writer.write(status, self.generation)

    async def _invalid(self, status: FederatedTrainingStatus, message: str, now: datetime) -> Outcome:
        """An invalid spec: an Invalid condition and an event, and nothing else happens."""
        new_status = status.model_copy(deep=True)
        set_condition(new_status, ConditionType.INVALID, True, INVALID_SPEC, message, now)
        set_condition(new_status, ConditionType.READY, False, INVALID_SPEC, message, now)
        new_status.message = f"invalid spec: {message}"
        events = [] if self.runtime.invalid == message else [Event("Warning", INVALID_SPEC, message)]
        self.runtime.invalid = message
        if await self.runtime.writer.write(new_status, self.generation):
            self.context.metrics.status_written(self.ref, None, status, new_status, {})
        return Outcome(delay=self.settings.resync_seconds, events=events)


def _problem_text(text: str) -> str:
    """The message of an error reply (the aggregator's envelope, or a Kubernetes Status), else the text."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    if not isinstance(payload, dict):
        return text
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else payload.get("message")
    return str(message) if message else text


def _condition_true(status: FederatedTrainingStatus, kind: ConditionType) -> bool:
    return any(c.type is kind and c.status == "True" for c in status.conditions)


def _failed_for_its_spec(status: FederatedTrainingStatus) -> bool:
    return any(
        c.type is ConditionType.FAILED and c.status == "True" and c.reason == INVALID_SPEC
        for c in status.conditions
    )
