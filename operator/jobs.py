"""Trainer Jobs on a cluster: their states as the Job watch reports them, and starting and stopping
them (the Kubernetes `JobPort` of the driver core)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedtrain.api import FederatedTrainingSpec
from fedtrain.job import TrainerJob

from . import manifests
from .engine import JobObservation, JobState, StartSiteJob, StopSiteJob
from .kube import Kube
from .manifests import PodDefaults, TrainingRef

#: site, round, attempt
JobKey = tuple[str, int, int]


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


class KubeJobs:
    """One training's trainer Jobs: each with a Secret holding its job file, owned by the Job."""

    def __init__(
        self,
        kube: Kube,
        table: JobTable,
        ref: TrainingRef,
        spec: FederatedTrainingSpec,
        defaults: PodDefaults,
    ) -> None:
        self.kube = kube
        self.table = table
        self.ref = ref
        self.spec = spec
        self.defaults = defaults

    def observe(self, round_index: int) -> dict[tuple[str, int], JobObservation]:
        return self.table.round_view(self.ref.uid, round_index)

    async def start(self, action: StartSiteJob, job: TrainerJob) -> None:
        """The Job first, then its Secret owned by it (two calls, not three).

        Its pod waits for the Secret volume, which follows within milliseconds; a Job that exists
        already (a restart between the two calls) is read back so that its Secret can be made.
        """
        site = self.spec.site(action.site)
        manifest = manifests.trainer_job(
            self.ref, self.spec, site, action.round, action.attempt, action.mode, self.defaults
        )
        name = manifest["metadata"]["name"]
        created = await self.kube.create(manifest) or await self.kube.read("Job", site.namespace, name)
        self.table.assume_active(self.ref.uid, (action.site, action.round, action.attempt))
        if created is None:  # deleted again at once (a suspend): nothing to hand the URLs to
            return
        config = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        await self.kube.create(
            manifests.trainer_secret(self.ref, site, action.round, action.attempt, config, created)
        )

    async def stop(self, action: StopSiteJob) -> None:
        namespace = self.spec.site(action.site).namespace
        name = manifests.job_name(self.ref, action.site, action.round, action.attempt)
        # Background propagation: garbage collection removes its pods and its Secret (owned by it).
        await self.kube.delete("Job", namespace, name)
