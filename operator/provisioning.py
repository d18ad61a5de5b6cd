"""The aggregator of a training on a cluster: its token Secret, ConfigMap, Deployment and Service."""

from __future__ import annotations

import json
import secrets

from fedtrain.api import FederatedTrainingSpec

from . import manifests
from .kube import Kube
from .manifests import PodDefaults, TrainingRef


class Provisioner:
    """Makes sure a training's aggregator objects exist and match its spec; scales it to zero at the end.

    What it applied last is remembered (`applied`), so an unchanged spec costs no API call.
    """

    def __init__(self, kube: Kube, ref: TrainingRef, defaults: PodDefaults) -> None:
        self.kube = kube
        self.ref = ref
        self.defaults = defaults

    async def token(self, known: str | None) -> str:
        """The aggregator's bearer token: kept in a Secret, so a restarted operator uses the same."""
        if known is not None:
            return known
        name = manifests.token_secret_name(self.ref)
        existing = await self.kube.secret_data(self.ref.namespace, name)
        token = (existing or {}).get(manifests.TOKEN_KEY)
        if token:
            return token
        token = secrets.token_urlsafe(32)
        if await self.kube.create(manifests.token_secret(self.ref, token)) is None:
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
