"""A Kubernetes API for tests: kmock's KubernetesEmulator served over HTTP from a thread of its own.

The operator (kopf and the kubernetes client), the kubelet fixture and the tests all reach it over
real HTTP through a kubeconfig file, exactly as they would reach a cluster's API server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml
from kmock._internal import parsing as kmock_parsing

from fedtrain.api import GROUP, PLURAL, VERSION

#: How often the emulated garbage collector looks for objects whose owners are gone.
GC_INTERVAL = 0.3

VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]

#: What the emulator serves: kopf needs namespaces, events and CRDs besides what fedtrain uses.
RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs=VERBS),
    # Written by the kubelet fixture for the Deployments' pods (their container states).
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True, verbs=VERBS, subresources=["status"]),
    "v1/secrets": kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=VERBS),
    "v1/configmaps": kmock.ResourceInfo(kind="ConfigMap", namespaced=True, verbs=VERBS),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs=VERBS),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment", namespaced=True, verbs=VERBS, subresources=["status"]
    ),
    "batch/v1/jobs": kmock.ResourceInfo(kind="Job", namespaced=True, verbs=VERBS, subresources=["status"]),
    "coordination.k8s.io/v1/leases": kmock.ResourceInfo(kind="Lease", namespaced=True, verbs=VERBS),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs=VERBS
    ),
    f"{GROUP}/{VERSION}/{PLURAL}": kmock.ResourceInfo(
        kind="FederatedTraining",
        singular="federatedtraining",
        namespaced=True,
        verbs=VERBS,
        shortnames=["ft", "fedtrain"],
        subresources=["status"],
    ),
}


_KMOCK_PARSE_PATH = kmock_parsing.parse_path


def _parse_path(path: str) -> Any:
    """kmock's path parser, and the cluster-scoped Namespaces it cannot parse.

    kmock reads `/api/v1/namespaces[/{name}]` as a namespace's prefix with no resource after it (a
    500 on `GET /api/v1/namespaces`), so kopf, serving a list of namespaces, never learnt which exist.
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return kmock_parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _KMOCK_PARSE_PATH(path)


kmock_parsing.parse_path = _parse_path  # read through the module at each request


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the metadata an API server assigns: uid, resourceVersion, generation.

    kopf guards its own patches with the resourceVersion (a JSON-patch `test`), and the operator's
    observedGeneration needs a generation that moves when the spec changes.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        #: Requests served, by "<method> <resource>[/<subresource>] <client>" (the User-Agent's product).
        self.request_counts: collections.Counter[str] = collections.Counter()
        #: Objects deleted so far: the garbage collector looks for orphans only after one is.
        self.changes = 0
        #: When set, RBAC: a request it answers False for is refused with 403, as an API server does.
        self.authorizer: Callable[[str, Access], bool] | None = None
        #: What each bearer token asked for, as RBAC sees a request: (verb, group, resource, namespace).
        self.access: collections.defaultdict[str, set[Access]] = collections.defaultdict(set)

    async def _handle(self, request: Any) -> Any:
        self.request_counts[_request_kind(request)] += 1
        access = _access(request)
        if access is not None:
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            self.access[token].add(access)
            if self.authorizer is not None and not self.authorizer(token, access):
                raise kmock.KubernetesError(status=403, reason="Forbidden", message=_forbidden(token, access))
        data = request.data
        if request.resource is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            metadata = data.setdefault("metadata", {})
            if not metadata.get("name") and metadata.get("generateName"):
                metadata["name"] = f"{metadata['generateName']}{uuid.uuid4().hex[:8]}"
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", _now())
            metadata["resourceVersion"] = str(next(self._versions))
            metadata["generation"] = 1
        elif request.resource is not None and request.action == kmock.action.UPDATE and request.name:
            self._check_version(request)
            version = str(next(self._versions))
            if isinstance(data, dict):
                data.setdefault("metadata", {})["resourceVersion"] = version
                if "spec" in data:
                    data["metadata"]["generation"] = self._generation(request) + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        try:
            return await super()._handle(request)
        finally:
            if self._gone(request):
                self.changes += 1  # something may have lost its owner
            # kmock logs every request and scans the whole log on each new one, so every request costs
            # more than the last; nothing here asserts on past requests: keep only those in flight.
            for index, seen in enumerate(self._requests):
                if seen is request:
                    del self._requests[index]
                    break

    def _gone(self, request: Any) -> bool:
        """A delete, or a patch that removed an object's last finalizer (and with it the object)."""
        if request.method == kmock.method.DELETE:
            return True
        if request.method not in (kmock.method.PATCH, kmock.method.PUT) or not request.name:
            return False
        try:
            return bool(self.objects[(request.resource, request.namespace, request.name)].deleted)
        except KeyError:
            return False

    def orphans(self) -> list[str]:
        """API paths of objects whose owners are all gone: what the garbage collector deletes."""
        alive = {
            (obj.raw.get("metadata") or {}).get("uid") for obj in self.objects.values() if not obj.deleted
        }
        paths = []
        for (resource, namespace, name), obj in list(self.objects.items()):
            if obj.deleted:
                continue
            owners = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
            if owners and not any(owner.get("uid") in alive for owner in owners):
                root = (
                    f"/apis/{resource.group}/{resource.version}"
                    if resource.group
                    else f"/api/{resource.version}"
                )
                where = f"/namespaces/{namespace}" if namespace else ""
                paths.append(f"{root}{where}/{resource.plural}/{name}")
        return paths

    def _check_version(self, request: Any) -> None:
        """Optimistic concurrency as an API server does it: a stale resourceVersion is refused."""
        data = request.data
        if isinstance(data, list):
            tests = [op for op in data if op.get("op") == "test" and op.get("path") == _RV_PATH]
            expected = [op.get("value") for op in tests]
            status, reason = 422, "Invalid"  # kopf reads 422 as "newer changes pending, try again"
        elif isinstance(data, dict):
            expected = [v] if (v := (data.get("metadata") or {}).get("resourceVersion")) else []
            status, reason = 409, "Conflict"
        else:
            return
        current = self._stored(request).get("metadata", {}).get("resourceVersion")
        if expected and current is not None and expected[0] != current:
            raise kmock.KubernetesError(
                status=status,
                reason=reason,
                message=f"the object has been modified (resourceVersion {current}, not {expected[0]})",
            )

    def _stored(self, request: Any) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        try:
            return dict(self.objects[key])
        except KeyError:
            return {}

    def _generation(self, request: Any) -> int:
        key = (request.resource, request.namespace, request.name)
        try:
            stored = self.objects[key]
        except KeyError:
            return 0
        return int((stored.get("metadata") or {}).get("generation") or 0)


_RV_PATH = "/metadata/resourceVersion"


def _request_kind(request: Any) -> str:
    resource = getattr(request.resource, "plural", None) or "-"
    if request.subresource:
        resource = f"{resource}/{request.subresource}"
    watch = "watch " if request.params.get("watch") in ("true", "1") else ""
    agent = (request.headers.get("User-Agent") or "-").split("/", 1)[0]
    method = getattr(request.method, "value", request.method)
    return f"{watch}{method} {resource} {agent}"


#: A request as RBAC authorizes it: verb, API group, resource[/subresource], namespace (None: cluster).
Access = tuple[str, str, str, str | None]


def _access(request: Any) -> Access | None:
    resource = request.resource
    if resource is None or not getattr(resource, "plural", None):
        return None
    method = str(getattr(request.method, "value", request.method)).upper()
    if method == "GET":
        verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, "")
        if method == "DELETE":
            verb = "delete" if request.name else "deletecollection"
    plural = f"{resource.plural}/{request.subresource}" if request.subresource else resource.plural
    return verb, resource.group or "", plural, request.namespace or None


def _forbidden(user: str, access: Access) -> str:
    """The API server's words for a request RBAC refuses."""
    verb, group, resource, namespace = access
    plural, _, subresource = resource.partition("/")
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    what = f"{plural}.{group}" if group else plural
    sub = f' subresource "{subresource}"' if subresource else ""
    return (
        f'{what} is forbidden: User "{user}" cannot {verb} resource "{plural}"{sub} '
        f'in API group "{group}" {where}'
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Emulator:
    """The emulator and its HTTP server, running on an event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.handler: ApiServer | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="kube-emulator", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as error:  # surfaced by start()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as handler, kmock.Server(handler) as server:
            for key, info in RESOURCES.items():
                handler.resources[key] = info
            self.handler = handler
            self.url = str(server.url).rstrip("/")
            collector = asyncio.ensure_future(self._collect_garbage(handler))
            self._ready.set()
            await self._stop.wait()
            collector.cancel()

    async def _collect_garbage(self, handler: ApiServer) -> None:
        """Kubernetes' garbage collector: an object whose owners are all gone is deleted, over HTTP
        as any client would (a trainer's Secret with its Job, the aggregator's objects with the
        training), every GC_INTERVAL seconds."""
        seen = 0
        async with aiohttp.ClientSession(self.url) as session:
            while True:
                await asyncio.sleep(GC_INTERVAL)
                if handler.changes == seen:
                    continue
                seen = handler.changes
                for path in handler.orphans():
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.delete(path, params={"propagationPolicy": "Background"}):
                            pass

    def start(self) -> Emulator:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator did not start") from self._error
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def write_kubeconfig(self, path: Path, token: str = "test-token") -> Path:
        """A kubeconfig for this server; a `token` of its own tells a client's requests apart (`access`)."""
        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))
        return path


@contextmanager
def running_emulator() -> Iterator[Emulator]:
    emulator = Emulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()
