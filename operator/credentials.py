"""A training's store credentials on a cluster, and the URLs signed with them.

The operator signs every trainer URL with the keys of the training's `storage.credentialsSecret`
(or, without one, its own identity: IRSA, instance profile), and reaches the base weights' bucket
with the same endpoint and keys. Trainers never see the keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fedtrain.api import FederatedTrainingSpec, StorageSpec
from fedtrain.errors import INVALID_SPEC, PermanentError, TemporaryError
from fedtrain.pretrained import pretrained_object
from fedtrain.sealing import DataKey
from fedtrain.store import S3Store

from . import manifests
from .core import Signer
from .kube import Kube
from .manifests import TrainingRef

#: Opens (or reuses) the store of a StorageSpec with given keys: the operator shares boto3 clients.
StoreCache = Callable[[StorageSpec, str | None, str | None], Awaitable[S3Store]]

ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"


class KubeCredentials:
    """The `CredentialsPort` of the operator: keys read from the training's Secret once per spec."""

    def __init__(self, kube: Kube, ref: TrainingRef, spec: FederatedTrainingSpec, stores: StoreCache) -> None:
        self.kube = kube
        self.ref = ref
        self.spec = spec
        self.stores = stores
        self.keys: tuple[str | None, str | None] | None = None
        self._store: S3Store | None = None
        self._data_key: DataKey | None = None

    async def _keys(self) -> tuple[str | None, str | None]:
        if self.keys is None:
            storage = self._storage()
            if not storage.credentials_secret:
                self.keys = (None, None)
            else:
                secret = await self.kube.secret_data(self.ref.namespace, storage.credentials_secret)
                if secret is None:
                    name = f"{self.ref.namespace}/{storage.credentials_secret}"
                    raise TemporaryError(f"Secret {name} (spec.storage.credentialsSecret) does not exist")
                missing = [key for key in (ACCESS_KEY, SECRET_KEY) if not secret.get(key)]
                if missing:
                    name = f"{self.ref.namespace}/{storage.credentials_secret}"
                    raise TemporaryError(
                        f"Secret {name} (spec.storage.credentialsSecret) has no {' or '.join(missing)}: "
                        "add the keys under those names"
                    )
                self.keys = (secret[ACCESS_KEY], secret[SECRET_KEY])
        return self.keys

    def _storage(self) -> StorageSpec:
        storage = self.spec.object_storage
        if storage is None:  # refused when the spec was validated; kept for the type checker
            raise PermanentError("spec.storage.bucket is required on a cluster", reason=INVALID_SPEC)
        return storage

    async def store(self) -> S3Store:
        """The training's bucket, with its keys (for presigning and the history)."""
        if self._store is None:
            self._store = await self.stores(self._storage(), *await self._keys())
        return self._store

    async def signer(self) -> Signer:
        return await self.store()

    async def data_key(self) -> DataKey | None:
        """privacy.encryptAtRest: the data key the provisioner keeps in the training's Secret."""
        if not self.spec.privacy.encrypt_at_rest:
            return None
        if self._data_key is None:
            name = manifests.token_secret_name(self.ref)
            secret = await self.kube.secret_data(self.ref.namespace, name) or {}
            if not secret.get(manifests.DATA_KEY_KEY):
                raise TemporaryError(f"Secret {self.ref.namespace}/{name} holds no data key yet")
            self._data_key = DataKey.from_base64(secret[manifests.DATA_KEY_KEY])
        return self._data_key

    async def pretrained_url(self, expires_seconds: int) -> str | None:
        found = pretrained_object(self.spec)
        if found is None:
            return None
        storage, key = found
        bucket = await self.stores(storage, *await self._keys())
        return bucket.presign_get(key, expires_seconds)  # signing is local: no request is made
