"""The few Kubernetes API calls the operator makes, as async functions over the kubernetes client.

The kubernetes client is synchronous; its calls run in worker threads so the operator's event loop
(kopf's) never blocks. Objects travel as plain dicts (`_preload_content=False`): the builders in
`manifests.py` make dicts, and parsing replies into the client's model classes would only cost time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, ApiException

from fedtrain.api import GROUP, PLURAL, VERSION
from fedtrain.errors import DEFAULT_RETRY_SECONDS, PermanentError, TemporaryError

Manifest = dict[str, Any]

# The client would otherwise label a dict body as a JSON patch (a list of operations).
MERGE_PATCH = "application/merge-patch+json"
#: A missing permission is fixed by a person: look again every so often, not every few seconds.
FORBIDDEN_RETRY_SECONDS = 10.0


class KubeError(RuntimeError):
    """An API call failed for a reason other than the object existing or missing.

    Build one with `KubeError.of`, which classifies it: an object the API server refuses as invalid
    (400, 422) is a `KubeRejectedError` (permanent: the training fails); a 403 is a `KubeForbiddenError`
    (a wait, bounded, naming what the operator's RBAC lacks); anything else (429, 5xx, a connection
    error) is a `KubeUnavailableError` (retried, bounded).
    """

    def __init__(self, action: str, error: ApiException) -> None:
        detail = error.reason or ""
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(error.body or "{}").get("message", detail)
        super().__init__(f"{action}: HTTP {error.status}: {detail}")
        self.status = error.status

    @staticmethod
    def of(action: str, error: ApiException) -> KubeError:
        if error.status in (400, 422):
            return KubeRejectedError(action, error)
        if error.status == 403:
            return KubeForbiddenError(action, error)
        return KubeUnavailableError(action, error)


class KubeUnavailableError(KubeError, TemporaryError):
    """Worth retrying: the API server is busy or away, or a permission is missing for now."""

    def __init__(self, action: str, error: ApiException) -> None:
        KubeError.__init__(self, action, error)
        self.delay = DEFAULT_RETRY_SECONDS


class KubeForbiddenError(KubeError, TemporaryError):
    """The operator's RBAC does not allow the call (403): a wait, bounded, until the rules are fixed.

    Its message names the verb, the resource and the namespace, and the chart values that grant them.
    """

    def __init__(self, action: str, error: ApiException) -> None:
        KubeError.__init__(self, action, error)
        self.args = (
            f"{self}; the operator may not {action} (RBAC): serve the namespace with the chart's "
            "watchNamespaces or siteNamespaces, or grant the verb in its Role",
        )
        self.delay = FORBIDDEN_RETRY_SECONDS
        self.reason = "Forbidden"


class KubeRejectedError(KubeError, PermanentError):
    """The API server refuses the object itself: the same request can never succeed."""

    def __init__(self, action: str, error: ApiException) -> None:
        KubeError.__init__(self, action, error)
        self.reason = "KubernetesRejected"


def load_api_client(kubeconfig: Path | None = None, connections: int | None = None) -> ApiClient:
    """A kubeconfig file if given; in a pod, its service account; else $KUBECONFIG or ~/.kube/config.

    `connections`: how many pooled connections to the API server (the client's default is a few).
    """
    configuration = kubernetes.client.Configuration()
    if connections is not None:
        configuration.connection_pool_maxsize = connections
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        return ApiClient(configuration)
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return ApiClient(configuration)


def connection_info(api_client: ApiClient) -> dict[str, Any]:
    """kopf's connection settings from the client's, so both talk to one API server as one user."""
    config = api_client.configuration
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return {
        "server": config.host,
        "ca_path": config.ssl_ca_cert,
        "insecure": not config.verify_ssl,
        "username": config.username or None,
        "password": config.password or None,
        "scheme": scheme or None,
        "token": token or None,
        "certificate_path": config.cert_file,
        "private_key_path": config.key_file,
    }


def _decode(response: Any) -> Manifest:
    data = response.data
    return json.loads(data) if data else {}


def _matches(item: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    # Selectors are also checked here: a server that ignores labelSelector must not widen a delete.
    have = item.get("metadata", {}).get("labels") or {}
    return all(have.get(key) == value for key, value in labels.items())


class Kube:
    """Create, patch, list and delete the kinds the operator manages, and its resource's status."""

    def __init__(self, api_client: ApiClient) -> None:
        self.api_client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        # The typed client's calls for each managed kind: (create, read, patch, delete, list).
        self._by_kind: dict[str, tuple[Callable[..., Any], ...]] = {
            "Job": (
                self.batch.create_namespaced_job,
                self.batch.read_namespaced_job,
                self.batch.patch_namespaced_job,
                self.batch.delete_namespaced_job,
                self.batch.list_namespaced_job,
            ),
            "Secret": (
                self.core.create_namespaced_secret,
                self.core.read_namespaced_secret,
                self.core.patch_namespaced_secret,
                self.core.delete_namespaced_secret,
                self.core.list_namespaced_secret,
            ),
            "ConfigMap": (
                self.core.create_namespaced_config_map,
                self.core.read_namespaced_config_map,
                self.core.patch_namespaced_config_map,
                self.core.delete_namespaced_config_map,
                self.core.list_namespaced_config_map,
            ),
            "Service": (
                self.core.create_namespaced_service,
                self.core.read_namespaced_service,
                self.core.patch_namespaced_service,
                self.core.delete_namespaced_service,
                self.core.list_namespaced_service,
            ),
            # Only listed: the aggregator's pods say why it does not answer (provisioning.py).
            "Pod": (
                self.core.create_namespaced_pod,
                self.core.read_namespaced_pod,
                self.core.patch_namespaced_pod,
                self.core.delete_namespaced_pod,
                self.core.list_namespaced_pod,
            ),
            "Deployment": (
                self.apps.create_namespaced_deployment,
                self.apps.read_namespaced_deployment,
                self.apps.patch_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
                self.apps.list_namespaced_deployment,
            ),
        }

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # Each caller turns an ApiException into a KubeError naming the object, or into its answer.
        return await asyncio.to_thread(function, *args, _preload_content=False, **kwargs)

    async def create(self, manifest: Manifest) -> Manifest | None:
        """Create an object; None if one of that name exists already (the deterministic-name case)."""
        kind, namespace = manifest["kind"], manifest["metadata"]["namespace"]
        create = self._by_kind[kind][0]
        try:
            return _decode(await self._call(create, namespace, manifest))
        except ApiException as error:
            if error.status == 409:
                return None
            raise KubeError.of(f"create {kind} {namespace}/{manifest['metadata']['name']}", error) from error

    async def read(self, kind: str, namespace: str, name: str) -> Manifest | None:
        try:
            return _decode(await self._call(self._by_kind[kind][1], name, namespace))
        except ApiException as error:
            if error.status == 404:
                return None
            raise KubeError.of(f"read {kind} {namespace}/{name}", error) from error

    async def patch(self, kind: str, namespace: str, name: str, patch: Manifest) -> Manifest | None:
        try:
            reply = await self._call(
                self._by_kind[kind][2], name, namespace, patch, _content_type=MERGE_PATCH
            )
            return _decode(reply)
        except ApiException as error:
            if error.status == 404:
                return None
            raise KubeError.of(f"patch {kind} {namespace}/{name}", error) from error

    async def apply(self, manifest: Manifest) -> Manifest:
        """Create the object, or patch it to the manifest's labels and spec (data) if it exists."""
        created = await self.create(manifest)
        if created is not None:
            return created
        metadata = manifest["metadata"]
        patch = {key: value for key, value in manifest.items() if key not in ("apiVersion", "kind")}
        patched = await self.patch(manifest["kind"], metadata["namespace"], metadata["name"], patch)
        return patched or manifest

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete an object and, for a Job, its pods; False if it was gone already."""
        try:
            await self._call(self._by_kind[kind][3], name, namespace, propagation_policy="Background")
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            raise KubeError.of(f"delete {kind} {namespace}/{name}", error) from error

    async def list_labelled(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[Manifest]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        try:
            reply = _decode(await self._call(self._by_kind[kind][4], namespace, label_selector=selector))
        except ApiException as error:
            raise KubeError.of(f"list {kind} in {namespace}", error) from error
        return [item for item in reply.get("items", []) if _matches(item, labels)]

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's values, decoded; None if there is no such Secret."""
        secret = await self.read("Secret", namespace, name)
        return None if secret is None else secret_values(secret)

    async def patch_training_status(self, namespace: str, name: str, status_patch: Manifest) -> bool:
        """Merge-patch the status subresource; False if the training is gone."""
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status_patch},
                _content_type=MERGE_PATCH,
            )
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            raise KubeError.of(f"patch status of {namespace}/{name}", error) from error


def secret_values(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's values, decoded from `data`; `stringData` too (an API server turns it into data, a
    test server may keep it as written)."""
    values = {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
    values.update(secret.get("stringData") or {})
    return values


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: removed keys become None."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    return patch
