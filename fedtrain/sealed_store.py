"""privacy.encryptAtRest for whoever holds the store itself (the aggregator, the local runner): an
ObjectStore that seals every tensor object (`*.safetensors`: global models, updates, site states,
server state, merged models) on the way in and opens it on the way out, with fedtrain.sealing.

The JSON beside them (round manifests, accepted-update pins) holds names, counts and checksums, no
tensor, and stays readable, so a person can follow a training in the bucket. A site's trainer does
not hold the store: it reads and writes through presigned URLs and seals and opens its objects
itself, with the same identities (`identity`), from the data key in its job file.

A sealed object is never mapped in place or read by byte range (`local_path` is None, and a ranged
read opens the whole object): what a reader sees has been authenticated first.
"""

from __future__ import annotations

import builtins
import tempfile
from pathlib import Path

from fedtrain.sealing import DataKey, ObjectIdentity, open_bytes, open_file, seal_bytes, seal_file
from fedtrain.store import ObjectStore

#: The objects that hold tensors, which encryption at rest seals.
SEALED_SUFFIX = ".safetensors"


def is_sealed_key(key: str) -> bool:
    """Whether encryption at rest seals the object under `key`."""
    return key.endswith(SEALED_SUFFIX)


def identity(training: str, key: str) -> ObjectIdentity:
    """What the object under `key` (relative to the training's store root) is sealed as."""
    return ObjectIdentity(training=training, key=key)


class SealedStore(ObjectStore):
    """`inner`, with every tensor object sealed under `data_key` as an object of `training`."""

    def __init__(self, inner: ObjectStore, data_key: DataKey, training: str) -> None:
        self.inner = inner
        self.data_key = data_key
        self.training = training

    def __repr__(self) -> str:
        return f"SealedStore({self.inner!r}, key {self.data_key.id})"

    def _identity(self, key: str) -> ObjectIdentity:
        return identity(self.training, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        if is_sealed_key(key):
            data = seal_bytes(self.data_key, self._identity(key), data)
        self.inner.put_bytes(key, data)

    def get_bytes(self, key: str) -> bytes:
        data = self.inner.get_bytes(key)
        return open_bytes(self.data_key, self._identity(key), data) if is_sealed_key(key) else data

    def put_file(self, key: str, path: Path) -> None:
        if not is_sealed_key(key):
            self.inner.put_file(key, path)
            return
        with tempfile.TemporaryDirectory(prefix="fedtrain-seal-") as scratch:
            sealed = Path(scratch) / "sealed"
            seal_file(self.data_key, self._identity(key), path, sealed)
            self.inner.put_file(key, sealed)

    def get_file(self, key: str, path: Path) -> None:
        if not is_sealed_key(key):
            self.inner.get_file(key, path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fedtrain-open-", dir=path.parent) as scratch:
            sealed = Path(scratch) / "sealed"
            self.inner.get_file(key, sealed)
            open_file(self.data_key, self._identity(key), sealed, path)

    def get_range(self, key: str, start: int, length: int) -> tuple[bytes, int]:
        if not is_sealed_key(key):
            return self.inner.get_range(key, start, length)
        data = self.get_bytes(key)  # a sealed object is authenticated whole before any byte is used
        return data[start : start + length], len(data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def uri(self, key: str) -> str:
        return self.inner.uri(key)

    def presign_get(self, key: str, expires_seconds: int) -> str:
        return self.inner.presign_get(key, expires_seconds)

    def presign_put(self, key: str, expires_seconds: int) -> str:
        return self.inner.presign_put(key, expires_seconds)

    def local_path(self, key: str) -> Path | None:
        return None if is_sealed_key(key) else self.inner.local_path(key)
