"""An in-memory stand-in for `fedtrain.operator.kube.Kube` that records every call.

The reconciler's parts (jobs, provisioning, credentials, status writer, cleanup) talk to the cluster
only through `Kube`; this class has the same async methods with the same meaning, so each part can be
unit-tested against hand-built bodies without an API server:

- `create` returns None if the name exists (409), else the object as a server would return it (with
  a `metadata.uid`; a Secret's `stringData` turned into base64 `data`, as the API server does);
- `read` and `patch` return None for an absent object (404); `patch` merges an RFC 7386 patch;
- `apply` creates or patches, like `Kube.apply`; `delete` returns False if the object was gone, and
  removes what the object owned in its namespace, as the garbage collector does;
- `list_labelled` returns the objects of a kind in a namespace that carry all the labels;
- `secret_data` decodes `data` (base64) and `stringData`;
- `patch_training_status` merges into a stored FederatedTraining's status; False if it is absent.

Objects live in `objects`, keyed by (kind, namespace, name); `calls` lists every public call in order.
`forbid(kind, namespace)` makes every call on that kind in that namespace raise `KubeError` 403, as
for a namespace outside the operator's RBAC (or another status, for errors that must not be skipped).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException

from fedtrain.api import KIND
from fedtrain.operator.kube import Kube, KubeError, Manifest, secret_values

ObjectKey = tuple[str, str, str]  # kind, namespace, name


@dataclass(frozen=True)
class Call:
    """One call of a `Kube` method: what was asked, of which object, with which body (a copy)."""

    method: str
    kind: str
    namespace: str
    name: str
    body: Any = None


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 MergePatch: a mapping patch merges key by key, null removes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def _server_side(manifest: Mapping[str, Any]) -> Manifest:
    """What the API server stores: stringData folded into base64 data for a Secret."""
    stored = copy.deepcopy(dict(manifest))
    if stored.get("kind") == "Secret" and "stringData" in stored:
        data = dict(stored.get("data") or {})
        for key, value in stored.pop("stringData").items():
            data[key] = base64.b64encode(value.encode()).decode()
        stored["data"] = data
    return stored


class RecordingKube(Kube):
    """`Kube` over a dict: same methods, same answers, every call recorded."""

    def __init__(self) -> None:  # no API client: nothing of the base class's state is used
        self.objects: dict[ObjectKey, Manifest] = {}
        self.calls: list[Call] = []
        self.forbidden: dict[tuple[str, str], int] = {}
        self.messages: dict[tuple[str, str], str] = {}
        self._versions = itertools.count(1)

    # ---------------------------------------------------------------------------------------------
    # for tests

    def forbid(self, kind: str, namespace: str, status: int = 403, message: str | None = None) -> None:
        """Every call on `kind` in `namespace` fails with HTTP `status` (403: forbidden) from now on,
        with `message` as the API server's Status message when given."""
        self.forbidden[(kind, namespace)] = status
        if message is not None:
            self.messages[(kind, namespace)] = message

    def put(self, manifest: Mapping[str, Any]) -> Manifest:
        """Store an object as given (no call recorded): what was in the cluster before the test."""
        stored = copy.deepcopy(dict(manifest))
        metadata = stored.setdefault("metadata", {})
        metadata.setdefault("uid", str(uuid.uuid4()))
        self.objects[(stored["kind"], metadata["namespace"], metadata["name"])] = stored
        return copy.deepcopy(stored)

    def get(self, kind: str, namespace: str, name: str) -> Manifest | None:
        """The stored object (a copy), without recording a call."""
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def methods(self) -> list[str]:
        return [call.method for call in self.calls]

    def calls_of(self, method: str, kind: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and (kind is None or c.kind == kind)]

    def forget_calls(self) -> None:
        self.calls.clear()

    def _record(self, method: str, kind: str, namespace: str, name: str, body: Any = None) -> None:
        self.calls.append(Call(method, kind, namespace, name, copy.deepcopy(body)))
        status = self.forbidden.get((kind, namespace))
        if status is not None:
            error = ApiException(status=status, reason="Forbidden" if status == 403 else "Error")
            if (kind, namespace) in self.messages:
                error.body = json.dumps({"message": self.messages[(kind, namespace)]})
            raise KubeError.of(f"{method} {kind} in {namespace}", error)

    def _stamp(self, stored: Manifest) -> None:
        stored["metadata"]["resourceVersion"] = str(next(self._versions))

    # ---------------------------------------------------------------------------------------------
    # Kube's methods

    async def create(self, manifest: Manifest) -> Manifest | None:
        kind, metadata = manifest["kind"], manifest["metadata"]
        key = (kind, metadata["namespace"], metadata["name"])
        self._record("create", *key, manifest)
        if key in self.objects:
            return None
        stored = _server_side(manifest)
        stored["metadata"]["uid"] = str(uuid.uuid4())
        self._stamp(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    async def read(self, kind: str, namespace: str, name: str) -> Manifest | None:
        self._record("read", kind, namespace, name)
        return self.get(kind, namespace, name)

    async def patch(self, kind: str, namespace: str, name: str, patch: Manifest) -> Manifest | None:
        self._record("patch", kind, namespace, name, patch)
        key = (kind, namespace, name)
        if key not in self.objects:
            return None
        stored = _server_side(merge(self.objects[key], patch))
        self._stamp(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    async def apply(self, manifest: Manifest) -> Manifest:
        kind, metadata = manifest["kind"], manifest["metadata"]
        key = (kind, metadata["namespace"], metadata["name"])
        self._record("apply", *key, manifest)
        if key not in self.objects:
            stored = _server_side(manifest)
            stored["metadata"]["uid"] = str(uuid.uuid4())
        else:
            patch = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
            stored = _server_side(merge(self.objects[key], patch))
        self._stamp(stored)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self._record("delete", kind, namespace, name)
        removed = self.objects.pop((kind, namespace, name), None)
        if removed is not None:
            self._collect_garbage(namespace, removed["metadata"].get("uid"))
        return removed is not None

    def _collect_garbage(self, namespace: str, owner_uid: str | None) -> None:
        """The garbage collector: what the deleted object owned (same namespace) goes too."""
        owned = [
            key
            for key, item in self.objects.items()
            if key[1] == namespace
            and any(ref.get("uid") == owner_uid for ref in item["metadata"].get("ownerReferences") or [])
        ]
        for key in owned:
            removed = self.objects.pop(key)
            self._collect_garbage(namespace, removed["metadata"].get("uid"))

    async def list_labelled(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[Manifest]:
        self._record("list", kind, namespace, "", dict(labels))
        found = []
        for (have_kind, have_namespace, _), item in sorted(self.objects.items()):
            have = item.get("metadata", {}).get("labels") or {}
            if (have_kind, have_namespace) == (kind, namespace) and all(
                have.get(label) == value for label, value in labels.items()
            ):
                found.append(copy.deepcopy(item))
        return found

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self._record("secret_data", "Secret", namespace, name)
        secret = self.get("Secret", namespace, name)
        return None if secret is None else secret_values(secret)

    async def patch_training_status(self, namespace: str, name: str, status_patch: Manifest) -> bool:
        self._record("patch_status", KIND, namespace, name, status_patch)
        key = (KIND, namespace, name)
        if key not in self.objects:
            return False
        self.objects[key] = merge(self.objects[key], {"status": status_patch})
        return True
