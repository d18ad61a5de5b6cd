"""The aggregator of a training on a cluster: its token Secret, ConfigMap, Deployment and Service,
and, when it cannot be reached, why: its pod's state and its own readiness answer."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fedtrain.api import FederatedTrainingSpec
from fedtrain.sealing import DataKey

from . import manifests
from .kube import Kube, KubeError
from .manifests import PodDefaults, TrainingRef

#: Asks a running pod's /readyz (by its name and IP) and returns why it is not ready, or None.
ReadinessProbe = Callable[[str, str], Awaitable[str | None]]

#: Waiting reasons of a container that is merely on its way (not a cause worth naming alone).
STARTING = frozenset({"ContainerCreating", "PodInitializing"})


class Provisioner:
    """Makes sure a training's aggregator objects exist and match its spec; scales it to zero at the end.

    What it applied last is remembered (`applied`), so an unchanged spec costs no API call.
    """

    def __init__(self, kube: Kube, ref: TrainingRef, defaults: PodDefaults) -> None:
        self.kube = kube
        self.ref = ref
        self.defaults = defaults

    async def token(self, known: str | None, spec: FederatedTrainingSpec) -> str:
        """The aggregator's bearer token: kept in a Secret, so a restarted operator uses the same.

        Under privacy.encryptAtRest the Secret also holds the training's data key, made with it and
        never replaced (the objects sealed under it would be lost; the field cannot change after
        creation, so a training that seals has had the key from its first reconcile): only the
        aggregator mounts the Secret, and trainers get the key in their own job files."""
        if known is not None:
            return known
        name = manifests.token_secret_name(self.ref)
        existing = await self.kube.secret_data(self.ref.namespace, name)
        token = (existing or {}).get(manifests.TOKEN_KEY)
        if token:
            return token
        token = secrets.token_urlsafe(32)
        data_key = DataKey.generate() if spec.privacy.encrypt_at_rest else None
        if await self.kube.create(manifests.token_secret(self.ref, token, data_key)) is None:
            # Another reconcile made it between the read and the create: use theirs.
            token = (await self.kube.secret_data(self.ref.namespace, name) or {})[manifests.TOKEN_KEY]
        return token

    async def apply(self, spec: FederatedTrainingSpec, applied: str | None) -> str:
        """Apply the ConfigMap, Deployment and Service for `spec` unless `applied` says they match;
        returns what to remember as applied."""
        config = json.dumps(spec.to_api(), sort_keys=True)
        if applied == config:
            return config
        await self.kube.apply(manifests.aggregator_config_map(self.ref, spec))
        await self.kube.apply(manifests.aggregator_deployment(self.ref, spec, self.defaults))
        await self.kube.apply(manifests.aggregator_service(self.ref))
        return config

    async def scale(self, replicas: int) -> None:
        name = manifests.aggregator_name(self.ref)
        await self.kube.patch("Deployment", self.ref.namespace, name, {"spec": {"replicas": replicas}})

    async def why_unavailable(self, readiness: ReadinessProbe | None = None) -> str | None:
        """What the aggregator's pods say about why it does not answer; None if they look well.

        Read from the pods the Deployment selects (their container's waiting reason, its last
        termination, their scheduling) and, for a pod that runs but is not ready, from its /readyz
        (the store it cannot reach). Best effort: a pod list the operator may not read says so.
        """
        try:
            pods = await self.kube.list_labelled(
                "Pod", self.ref.namespace, manifests.aggregator_selector(self.ref)
            )
        except KubeError as error:
            return f"its pods could not be read ({error})"
        name = manifests.aggregator_name(self.ref)
        if not pods:
            return f"Deployment {self.ref.namespace}/{name} has no pod (kubectl describe deployment {name})"
        causes = []
        for pod in pods:
            cause = pod_problem(pod)
            metadata, status = pod.get("metadata") or {}, pod.get("status") or {}
            if cause is None and readiness is not None and not pod_ready(pod) and status.get("podIP"):
                cause = await readiness(metadata.get("name", ""), status["podIP"])
            if cause is not None:
                causes.append(f"pod {metadata.get('name')}: {cause}")
        return "; ".join(causes) or None


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_problem(pod: Mapping[str, Any]) -> str | None:
    """Why a pod's (first) container does not serve, as kubectl describe would show it; None if it runs."""
    status = pod.get("status") or {}
    unscheduled = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "PodScheduled" and c.get("status") == "False"
        ),
        None,
    )
    if unscheduled is not None:
        return _reason_and_message(unscheduled, "not scheduled")
    containers = status.get("containerStatuses") or []
    if not containers:
        return f"{status.get('phase') or 'Pending'}, no container started yet"
    container = containers[0]
    state = container.get("state") or {}
    last = (container.get("lastState") or {}).get("terminated")
    restarts = int(container.get("restartCount") or 0)
    if "waiting" in state:
        waiting = state["waiting"] or {}
        cause = _reason_and_message(waiting, "waiting")
        if waiting.get("reason") in STARTING and last is None:
            return cause
        return cause + _last_termination(last, restarts)
    if "terminated" in state:
        return _termination(state["terminated"] or {}) + _last_termination(None, restarts)
    return None


def _reason_and_message(part: Mapping[str, Any], fallback: str) -> str:
    reason = part.get("reason") or fallback
    message = str(part.get("message") or "").strip()
    return f"{reason}: {message}" if message else str(reason)


def _termination(terminated: Mapping[str, Any]) -> str:
    text = f"{terminated.get('reason') or 'Terminated'} (exit code {terminated.get('exitCode')})"
    message = str(terminated.get("message") or "").strip()
    # The termination message is the container's last words (its log's tail): keep it short.
    return f"{text}: {message[-500:]}" if message else text


def _last_termination(last: Mapping[str, Any] | None, restarts: int) -> str:
    parts = [f"restarted {restarts} times"] if restarts else []
    if last:
        parts.append(f"last ended {_termination(last)}")
    return f" ({'; '.join(parts)})" if parts else ""
