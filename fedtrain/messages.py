"""What the round engine's drivers and the aggregator tell each other about a round.

The local runner calls the aggregator library in-process; the Kubernetes operator sends the same
models over the aggregator's HTTP API. Either way the engine sees these as observations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from annotated_types import Interval
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from fedtrain.api import DNS_LABEL, EvalMetrics, RejectedUpdate


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
    evaluation: EvalMetrics | None = Field(
        None, description="The global model on the site's validation split."
    )
    test_evaluation: EvalMetrics | None = Field(
        None, description="An evaluation report's: the final model on the site's test split."
    )
    test_uncertainty: EvalMetrics | None = Field(
        None, description="A report's, evaluation.uncertainty: the final model under the method, test split."
    )
    cross_site: dict[str, EvalMetrics] = Field(
        default_factory=dict,
        description="A report's, evaluation.crossSite: each site's local model on this site's test split.",
    )
    train_seconds: float | None = None
    train_metrics: dict[str, float] = Field(
        default_factory=dict, description="The trainer's own figures: train_loss, samples_per_second, ..."
    )
    site_model_uri: str | None = Field(
        None, description="An evaluation report's: the site's own merged model, where it publishes one."
    )


class Participant(Message):
    site: str
    weight: float = Field(description="Normalised weight of this site's update in the average.")
    samples: int
    sha256: str
    norm: float


class SecureAggregationRecord(Message):
    """privacy.secureAggregation: who took part in a round's protocol, as the aggregator saw it."""

    #: U2: the sites that shared their keys; U3: those whose masked input is in the sum.
    shared: list[str]
    masked: list[str]
    #: Sites of U2 that did not reveal their shares (dropped after sharing, or after masking): their
    #: masks were removed with the others' shares, so the round closed without them.
    dropped: list[str] = Field(default_factory=list)
    #: The sum of the weights of the masked inputs (the sum is what secure aggregation reveals).
    total_weight: int
    #: The worst-case absolute error per element of the decoded mean (fixed-point rounding).
    error_bound: float
    threshold: int
    degree: int
    #: privacy.dp: the noise std each site added to each element of its update (sigma C / sqrt(t)).
    site_noise_std: float | None = None


class RoundManifest(Message):
    """Written last when a round closes; closing the round again returns it unchanged."""

    training: str
    round: int
    strategy: str
    #: The strategy's settings as used (a server optimizer's learning rate and decays, f for krum).
    strategy_parameters: dict[str, float] = Field(default_factory=dict)
    #: A server optimizer's state after this round (its moments), written before this manifest.
    server_state_key: str | None = None
    #: Robust strategies: participants whose update the aggregate left out (krum, multiKrum), and for
    #: trimmedMean the share of coordinates at which each participant's value was trimmed.
    not_selected: list[str] = Field(default_factory=list)
    trimmed_share: dict[str, float] = Field(default_factory=dict)
    #: lora.aggregation product: the share of each adapted layer's mean weight change (its squared
    #: Frobenius norm) that the rank-r factors of the next global model keep.
    lora_energy: dict[str, float] = Field(default_factory=dict)
    #: Sites of a lower rank (sites[].loraRank): for each such rank, the share of each layer's mean
    #: weight change that the truncation those sites receive keeps (str(rank) -> layer -> share).
    lora_energy_by_rank: dict[str, dict[str, float]] = Field(default_factory=dict)
    #: privacy.clipNorm: the clip this round's updates were held to, and with adaptive clipping the
    #: next round's (written into the next global model's metadata too).
    clip_norm: float | None = None
    next_clip_norm: float | None = None
    weighting: str
    #: privacy.secureAggregation: the protocol's sets; the participants' weights are then unknown
    #: (each is listed with weight 0, sample count 0 and norm 0) and only the mean is.
    secure_aggregation: SecureAggregationRecord | None = None
    participants: list[Participant]
    rejected: list[RejectedUpdate] = Field(default_factory=list)
    model_key: str
    model_uri: str
    model_sha256: str
    closed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


# --------------------------------------------------------------------------------------------------
# The aggregator's HTTP API (`python -m fedtrain.aggregator serve`): request and reply bodies.

#: Site names are DNS labels (fedtrain.api.SiteSpec); anything else could not name an object key.
SITE_NAME = DNS_LABEL
#: A training has at most this many sites (spec.sites' maxItems): no request lists more.
MAX_SITES = 256
#: Rounds are fewer than spec.training.rounds' maximum; the evaluation round comes after the last.
MAX_ROUND_INDEX = 10_000
#: The engine records a rejection as "reason: message", the aggregator's message cut at 1,000 characters.
MAX_REASON_CHARS = 4096

#: A site named in a request: a DNS label of at most 63 characters.
SiteName = Annotated[str, Field(min_length=1, max_length=63, pattern=SITE_NAME)]


def _json_number(value: object) -> object:
    # Pydantic's lax mode reads true as 1 and "3" as 3; JSON Schema's integer is a number without a
    # fraction, so 3.0 stays valid and is left to the int validation.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected an integer, not {value!r}")
    return value


#: An integer as JSON Schema means it: a number with no fractional part (3 or 3.0, never true or "3").
JsonInteger = Annotated[int, BeforeValidator(_json_number)]
#: A round index where a field is optional (Field's bounds do not reach inside an Optional's schema).
RoundIndex = Annotated[int, Interval(ge=0, le=MAX_ROUND_INDEX), BeforeValidator(_json_number)]


class SubmitUpdateRequest(Message):
    """Hand a site's uploaded update of a round to the aggregator."""

    site: str = Field(
        ...,
        min_length=1,
        max_length=63,
        pattern=SITE_NAME,
        description="The site whose update (at the layout's update key of the round) to validate and fold.",
    )


class RecordedRejection(RejectedUpdate):
    """A rejection the engine recorded, as a close request carries it: a site name and a bounded reason."""

    site: SiteName = Field(..., description="Site name.")
    reason: str = Field(
        ..., max_length=MAX_REASON_CHARS, description="Why the aggregator rejected the update."
    )


class CloseRoundRequest(Message):
    """Close a round with the participants the engine recorded; closing a closed round is a no-op."""

    participants: list[SiteName] = Field(
        ...,
        max_length=MAX_SITES,
        description=(
            "Sites whose accepted updates make up the next global model, as the engine recorded them. "
            "After a restart the aggregator rebuilds the round from exactly these updates."
        ),
    )
    rejected: list[RecordedRejection] = Field(
        default_factory=list,
        max_length=MAX_SITES,
        description=(
            "Rejections the engine recorded; in the manifest they take precedence over the aggregator's own."
        ),
    )


class SecureAggregationRequest(Message):
    """privacy.secureAggregation: end the round's current protocol phase if it may end."""

    live: list[SiteName] = Field(
        ...,
        max_length=MAX_SITES,
        description=(
            "The round's sites still live (not failed, not stragglers): a phase waits for these, up to "
            "privacy.secureAggregation.phaseTimeoutSeconds, and never for the others."
        ),
    )
    started_at: datetime = Field(..., description="When the round started: the key phase's start.")
    now: datetime = Field(..., description="The engine's clock: the phase timeouts are measured with it.")


class SecureAggregationReply(Message):
    """Where a round's secure aggregation stands."""

    phase: str = Field(
        ..., description="keys, shares, inputs (waiting for those), unmasking (the request is out), closed."
    )
    waiting_on: list[str] = Field(default_factory=list, description="The live sites the phase waits for.")


class RetentionRequest(Message):
    """storage.retention: delete what a closed round no longer needs."""

    updates: bool = Field(
        False, description="Delete the round's updates and secure-aggregation objects (the round is closed)."
    )
    models: list[RoundIndex] = Field(
        default_factory=list,
        max_length=MAX_SITES,
        description="Delete the global models of these rounds (older than the window the spec keeps).",
    )


class RetentionReply(Message):
    """What a retention call deleted (objects already gone count too: deleting is idempotent)."""

    deleted: int = Field(..., description="Objects deleted.")


class MergeRequest(Message):
    """Write the final model, a round's global model with LoRA folded in, and the best round's."""

    round: JsonInteger = Field(
        ...,
        ge=0,
        le=MAX_ROUND_INDEX,
        description="The round whose global model to merge (the last closed round + 1).",
    )
    best_round: RoundIndex | None = Field(
        None, description="The round whose global model scored best on validation: merged as the best too."
    )


class ModelReply(Message):
    """Where a model the aggregator wrote (or found already written) lives."""

    model_uri: str = Field(..., description="URI of the model in the object store, s3://bucket/key.")
    best_model_uri: str | None = Field(
        None, description="A merge's: the best round's global model, merged the same way."
    )
    swag_model_uri: str | None = Field(
        None,
        description="A merge's, under evaluation.uncertainty swag: the SWAG model (merged at the SWAG mean, "
        "with its moments).",
    )


class RoundReply(Message):
    """What the aggregator knows of a round."""

    round: int = Field(..., description="Round index, from 0.")
    closed: bool = Field(..., description="Whether the round's manifest exists.")
    manifest: RoundManifest | None = Field(None, description="The round's manifest once it is closed.")
    verdicts: dict[str, UpdateVerdict] = Field(
        default_factory=dict,
        description=(
            "Verdicts by site: those given since this aggregator started while the round is open (empty "
            "after a restart), or derived from the manifest once it is closed."
        ),
    )


class FieldProblem(Message):
    """One thing wrong with a request."""

    field: str = Field(
        ..., description="Where: a body field ('participants.1'), a path parameter, or 'body'."
    )
    problem: str = Field(..., description="What is wrong with it.")
    type: str = Field(..., description="Pydantic's error type, e.g. missing, int_parsing, extra_forbidden.")


class ErrorBody(Message):
    """What went wrong, with a code a client can branch on."""

    code: str = Field(
        ...,
        description=(
            "Stable code: unauthorized, invalid-request, not-found, method-not-allowed, no-global-model, "
            "invalid-spec, aggregation-failed, store-unavailable, internal."
        ),
    )
    message: str = Field(..., description="What went wrong, for a person or a status message.")
    details: list[FieldProblem] | None = Field(None, description="Each problem of an invalid request.")


class ErrorReply(Message):
    """Every error the aggregator answers with, whatever the status code."""

    error: ErrorBody = Field(..., description="The error.")
