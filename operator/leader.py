"""Leader election over a coordination.k8s.io/v1 Lease: of several replicas, only one ever acts.

kopf's own peering pauses every operator when two of the same priority run, which leaves the
cluster unserved; a Lease is what Kubernetes controllers use: the holder renews it, and another
replica takes it over only once it has not been renewed for `lease_duration_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, ApiException

from .kube import MERGE_PATCH
from .settings import OperatorSettings

log = logging.getLogger(__name__)


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def may_take(lease_spec: dict[str, Any], identity: str, now: datetime) -> bool:
    """Whether `identity` may hold the Lease now: it holds it already, nobody does, or it expired."""
    holder = lease_spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse_time(lease_spec.get("renewTime")) or _parse_time(lease_spec.get("acquireTime"))
    duration = float(lease_spec.get("leaseDurationSeconds") or 0)
    return renewed is None or now >= renewed + timedelta(seconds=duration)


class LeaderElector:
    def __init__(
        self, api_client: ApiClient, settings: OperatorSettings, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.settings = settings
        self.identity = settings.identity
        self.clock = clock or (lambda: datetime.now(UTC))
        self.last_renewed: datetime | None = None

    def _lease(self, now: datetime, acquired: datetime, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.settings.lease_duration_seconds,
            "acquireTime": _micro_time(acquired),
            "renewTime": _micro_time(now),
            "leaseTransitions": transitions,
        }

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking I/O): True if this replica holds the Lease afterwards."""
        name, namespace = self.settings.lease_name, self.settings.lease_namespace
        now = self.clock()
        try:
            # Raw JSON: the API's field names and times as written, not the client's model.
            lease = json.loads(self.api.read_namespaced_lease(name, namespace, _preload_content=False).data)
        except ApiException as error:
            if error.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": self._lease(now, now, 0),
            }
            try:
                self.api.create_namespaced_lease(namespace, body)
            except ApiException as create_error:
                if create_error.status == 409:  # another replica created it first
                    return False
                raise
            self.last_renewed = now
            return True
        spec = lease.get("spec") or {}
        if not may_take(spec, self.identity, now):
            return False
        ours = spec.get("holderIdentity") == self.identity
        acquired = (_parse_time(spec.get("acquireTime")) or now) if ours else now
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        patch = {
            # The resourceVersion makes the API server refuse the patch if another replica wrote first.
            "metadata": {"resourceVersion": (lease.get("metadata") or {}).get("resourceVersion")},
            "spec": self._lease(now, acquired, transitions),
        }
        if patch["metadata"]["resourceVersion"] is None:
            del patch["metadata"]
        try:
            self.api.patch_namespaced_lease(name, namespace, patch, _content_type=MERGE_PATCH)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        if not ours:
            log.info("%s took the lease %s/%s", self.identity, namespace, name)
        self.last_renewed = now
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this replica leads (True), or until `stop` is set (False)."""
        while not stop.is_set():
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    return True
            except (ApiException, OSError) as error:
                log.warning("lease %s: %s", self.settings.lease_name, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.lease_renew_seconds)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew the Lease until `stop` is set; return early when leadership is lost."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.settings.lease_renew_seconds)
                return
            except TimeoutError:
                pass
            try:
                if not await asyncio.to_thread(self.try_acquire_or_renew):
                    log.error(
                        "%s lost the lease %s to another replica", self.identity, self.settings.lease_name
                    )
                    return
            except (ApiException, OSError) as error:
                log.warning("lease %s: renewal failed: %s", self.settings.lease_name, error)
                deadline = (self.last_renewed or self.clock()) + timedelta(
                    seconds=self.settings.lease_duration_seconds
                )
                if self.clock() >= deadline:
                    log.error("%s could not renew the lease in time: stepping down", self.identity)
                    return

    def release(self) -> None:
        """Give the Lease up at a clean shutdown, so a standby takes over at once."""
        try:
            self.api.patch_namespaced_lease(
                self.settings.lease_name,
                self.settings.lease_namespace,
                {"spec": {"holderIdentity": None}},
                _content_type=MERGE_PATCH,
            )
        except ApiException as error:
            log.warning("lease %s: release failed: %s", self.settings.lease_name, error)
