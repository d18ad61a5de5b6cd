"""The contract between whoever starts a trainer (local runner, operator) and the trainer itself.

A trainer gets one round of one site: the slice of the spec it needs and URLs for exactly the
objects it may touch (presigned on S3, file:// on the local store). It holds no store credentials.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedtrain.api import (
    MAX_CROSS_SITE_SITES,
    EvaluationSpec,
    ExchangeSpec,
    FederatedTrainingSpec,
    LoraSpec,
    ModelSpec,
    PrivacySpec,
    SiteSpec,
    TrainingMode,
    TrainingSpec,
    Weighting,
    keeps_personal,
    publishes_site_models,
)


class TrainerSpec(BaseModel):
    """The parts of a FederatedTraining spec one site needs, and that site's own entry."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec
    mode: TrainingMode = TrainingMode.FEDERATED
    lora: LoraSpec
    exchange: ExchangeSpec = Field(default_factory=ExchangeSpec)
    training: TrainingSpec
    evaluation: EvaluationSpec
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    site: SiteSpec

    @classmethod
    def for_site(cls, spec: FederatedTrainingSpec, site: str) -> TrainerSpec:
        """The site's part of `spec`; a site with its own loraRank builds its adapters at that rank."""
        own = spec.site(site)
        return cls(
            model=spec.model,
            mode=spec.mode,
            lora=spec.lora if own.lora_rank is None else spec.lora.model_copy(update={"rank": own.lora_rank}),
            exchange=spec.exchange,
            training=spec.training,
            evaluation=spec.evaluation,
            privacy=spec.privacy,
            site=own,
        )

    @property
    def keeps_personal(self) -> bool:
        return keeps_personal(self.mode, self.exchange)

    @property
    def publishes_site_models(self) -> bool:
        return publishes_site_models(self.mode, self.exchange)


#: The URL fields of a trainer job whose objects privacy.encryptAtRest seals (not pretrained_url: the
#: base weights are the user's own object).
SEALED_URL_FIELDS: Final = (
    "global_model_url",
    "update_url",
    "state_get_url",
    "state_put_url",
    "control_url",
    "site_model_url",
    "swag_put_url",
    "swag_get_url",
)


#: The job's field of cross-site model URLs; a sealed one's identity is named `cross_site_urls.<site>`.
CROSS_SITE_FIELD: Final = "cross_site_urls"


class Sealing(BaseModel):
    """privacy.encryptAtRest: the key a trainer seals and opens its objects with, and what each is."""

    model_config = ConfigDict(extra="forbid")

    data_key: str = Field(
        ...,
        min_length=44,
        max_length=44,
        description="The training's 32-byte data key, base64 (the job file is itself a Secret).",
    )
    object_keys: dict[str, str] = Field(
        ...,
        max_length=len(SEALED_URL_FIELDS) + MAX_CROSS_SITE_SITES,
        description=(
            "For each URL field of the job that it reads or writes an object through (global_model_url, "
            "update_url, ...; cross_site_urls.<site> for each cross-site model), the object's key in the "
            "training's store: the identity it is sealed as."
        ),
    )


class SecureAggregationUrls(BaseModel):
    """privacy.secureAggregation: the URLs of the round's protocol objects this site reads and writes.
    The masked input goes to the job's update_url."""

    model_config = ConfigDict(extra="forbid")

    advert_put_url: str = Field(description="PUT: this site's public keys and self-mask commitment.")
    roster_get_url: str = Field(description="GET: the aggregator's roster of the sites that advertised.")
    shares_put_url: str = Field(description="PUT: this site's key shares, encrypted to each neighbour.")
    inbox_get_url: str = Field(description="GET: the key shares the other sites addressed to this one.")
    request_get_url: str = Field(description="GET: the aggregator's unmask request (who shared, who masked).")
    reveal_put_url: str = Field(description="PUT: the shares this site reveals for the unmasking.")
    sites: int = Field(ge=2, description="The training's site count: the fixed-point code's site bound.")
    weighting: Weighting = Field(description="aggregation.weighting: what the site's masked weight is.")


class TrainerJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    training: str = Field(description="Training name, recorded in the update's metadata.")
    round: int = Field(ge=0)
    site: str
    attempt: int = Field(0, ge=0)
    mode: Literal["train", "evaluate"] = Field(
        "train", description="train: evaluate, train and upload an update; evaluate: only report metrics."
    )
    spec: TrainerSpec = Field(description="What this site needs of the training's spec.")
    global_model_url: str = Field(description="GET: the global model this round starts from.")
    update_url: str = Field(description="PUT: this site's update (or evaluation report).")
    state_get_url: str | None = Field(None, description="GET: this site's private optimizer state.")
    state_put_url: str | None = Field(None, description="PUT: this site's private optimizer state.")
    control_url: str | None = Field(
        None,
        description="GET, training under aggregation.controlVariates scaffold: the server control variate.",
    )
    site_model_url: str | None = Field(
        None,
        description="PUT, evaluation only: this site's own merged model, where the spec publishes "
        "site models (exchange.siteModels, or mode localOnly).",
    )
    swag_put_url: str | None = Field(
        None,
        description="PUT, the training rounds of evaluation.uncertainty swag's window: this site's SWAG "
        "moments of the exchanged tensors, written before the update.",
    )
    swag_get_url: str | None = Field(
        None,
        description="GET, the final evaluation under evaluation.uncertainty swag: the combined SWAG moments.",
    )
    cross_site_urls: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_CROSS_SITE_SITES,
        description=(
            "GET, the final evaluation under evaluation.crossSite: each site's last local model (a model, "
            "never data), scored on this site's test split."
        ),
    )
    pretrained_url: str | None = Field(None, description="GET: base weights when pretrained.source is uri.")
    sealing: Sealing | None = Field(
        None, description="privacy.encryptAtRest: the data key and the objects' identities."
    )
    secure_aggregation: SecureAggregationUrls | None = Field(
        None, description="privacy.secureAggregation, training rounds: the protocol's URLs."
    )
    transfer_deadline: datetime | None = Field(
        None,
        description="Transfers are retried, with backoff, until this time (the round's deadline); "
        "unset: a bound of 10 minutes.",
    )


def parse_job_file(text: str) -> Any:
    """The document of a trainer's job file: JSON (what the operator writes, fast to make) or YAML
    (what the local runner writes). JSON is tried first: YAML 1.1, which PyYAML reads, takes a JSON
    float without a dot such as 1e-05 for a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return yaml.safe_load(text)
