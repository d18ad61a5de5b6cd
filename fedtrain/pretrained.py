"""Where a training's base weights come from, for every component that needs them.

Three readers need them: trainers (through a presigned URL, or a file on their own disk), the
aggregator (to build the initial and the merged model) and the local runner (which hosts the
aggregator library). Each reaches the store with its own credentials, so the resolution takes a
function that opens a bucket; what the spec means is decided here alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedtrain.api import FederatedTrainingSpec, PretrainedSource, StorageSpec
from fedtrain.store import ObjectStore

#: Opens the bucket a StorageSpec names, with the caller's credentials.
StoreOpener = Callable[[StorageSpec], ObjectStore]


def pretrained_object(
    spec: FederatedTrainingSpec, endpoint: str | None = None
) -> tuple[StorageSpec, str] | None:
    """For `pretrained.source: uri`, the weights' bucket and key; None for other sources.

    The bucket is reached like the training's own storage (its endpoint and region), or at `endpoint`
    where the training names no storage (a local run against MinIO or moto).
    """
    pretrained = spec.model.pretrained
    if pretrained.source is not PretrainedSource.URI or not pretrained.location:
        return None
    bucket, _, key = pretrained.location.removeprefix("s3://").partition("/")
    if spec.object_storage is not None:
        return spec.object_storage.model_copy(update={"bucket": bucket, "prefix": ""}), key
    return StorageSpec(bucket=bucket, prefix="", endpoint=endpoint), key


def load_pretrained(
    spec: FederatedTrainingSpec, open_store: StoreOpener, endpoint: str | None = None
) -> Path | bytes | None:
    """The base weights as the aggregator builds models from them: a path, the bytes, or None (none
    or hub: timm fetches hub weights itself)."""
    pretrained = spec.model.pretrained
    if pretrained.source is PretrainedSource.FILE and pretrained.location:
        return Path(pretrained.location)
    found = pretrained_object(spec, endpoint)
    if found is None:
        return None
    storage, key = found
    return open_store(storage).get_bytes(key)


def presign_pretrained(
    spec: FederatedTrainingSpec, open_store: StoreOpener, expires_seconds: int, endpoint: str | None = None
) -> str | None:
    """The URL a trainer fetches `source: uri` weights from; None for other sources."""
    found = pretrained_object(spec, endpoint)
    if found is None:
        return None
    storage, key = found
    return open_store(storage).presign_get(key, expires_seconds)


def cluster_problems(spec: FederatedTrainingSpec) -> list[str]:
    """What a spec that is valid for a local run lacks on a cluster, each naming the field and the fix."""
    problems = []
    if spec.object_storage is None:
        problems.append(
            "spec.storage.bucket: required on a cluster (weights move only through object storage): "
            "set storage.bucket, and storage.endpoint for MinIO or Ceph"
        )
    if spec.model.pretrained.source is PretrainedSource.FILE:
        problems.append(
            "spec.model.pretrained.source: file names a path on one machine, which the aggregator pod "
            "cannot read: upload the weights and use source: uri with location: s3://bucket/key.safetensors"
        )
    return problems
