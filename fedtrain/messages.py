"""What the round engine's drivers and the aggregator tell each other about a round.

The local runner calls the aggregator library in-process; the Kubernetes operator sends the same
models over the aggregator's HTTP API. Either way the engine sees these as observations.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from fedtrain.api import EvalMetrics, RejectedUpdate


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpdateVerdict(Message):
    """The aggregator's answer to a submitted update: folded into the round, or rejected and why."""

    round: int
    site: str
    accepted: bool
    reason: str | None = Field(None, description="Stable code: checksum, names, shape, norm, ...")
    message: str | None = None
    samples: int = 0
    norm: float | None = None
    sha256: str | None = None
    update_bytes: int = 0
    evaluation: EvalMetrics | None = None
    train_seconds: float | None = None


class Participant(Message):
    site: str
    weight: float = Field(description="Normalised weight of this site's update in the average.")
    samples: int
    sha256: str
    norm: float


class RoundManifest(Message):
    """Written last when a round closes; closing the round again returns it unchanged."""

    training: str
    round: int
    strategy: str
    weighting: str
    participants: list[Participant]
    rejected: list[RejectedUpdate] = Field(default_factory=list)
    model_key: str
    model_uri: str
    model_sha256: str
    closed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
