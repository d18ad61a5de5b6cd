"""The status subresource: read once after a restart, then written as one merge patch per reconcile."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from fedtrain.api import FederatedTrainingStatus

from .kube import Kube, merge_patch
from .manifests import TrainingRef

log = logging.getLogger(__name__)


@dataclass
class StatusWriter:
    """Keeps the status this operator last wrote, so each write patches only what changed."""

    kube: Kube
    ref: TrainingRef
    status: FederatedTrainingStatus | None = None  # as last written by this operator
    written: dict[str, Any] | None = None  # the same, as sent to the API server

    def current(self, body: Mapping[str, Any]) -> FederatedTrainingStatus:
        """The status this operator last wrote, or after a restart the one in the resource."""
        if self.status is not None:
            return self.status
        raw = body.get("status") or {}
        try:
            status = FederatedTrainingStatus.model_validate(raw)
        except ValidationError as error:
            # Only someone editing the status by hand gets here; the rounds in the bucket are kept,
            # so starting from a fresh status repeats work but loses none.
            log.warning(
                "%s/%s: unreadable status (%s); starting afresh", self.ref.namespace, self.ref.name, error
            )
            status = FederatedTrainingStatus()
        self.status, self.written = status, dict(raw)
        return status

    async def write(self, status: FederatedTrainingStatus, generation: int | None) -> bool:
        """One merge patch of what changed; False if the training is gone."""
        if generation is not None:
            status.observed_generation = generation
        document = status.to_api()
        patch = merge_patch(self.written or {}, document)
        if patch and not await self.kube.patch_training_status(self.ref.namespace, self.ref.name, patch):
            return False
        self.status, self.written = status, document
        return True
