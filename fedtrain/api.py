"""The FederatedTraining resource: spec and status as a user writes them in YAML (camelCase).

These pydantic models are the single source of truth for the API. The CRD schema is generated from
them, the operator and the local runner validate bodies into them, and every field's description is
what `kubectl explain` shows. Keep every type expressible as a Kubernetes structural schema: no
free-form unions beyond int-or-string, maps with one value type, lists of objects keyed by `name`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import CoreSchema, ErrorDetails, PydanticCustomError, core_schema

GROUP = "fedtrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND: Final = "FederatedTraining"
PLURAL = "federatedtrainings"

#: How many round records the status keeps; the full history is in the object store as JSON lines.
STATUS_HISTORY_LIMIT = 20
#: A round's sites hold presigned URLs for its timeout plus the operator's grace, and S3 presigns for
#: at most 7 days: 6 days leaves a day for the grace.
MAX_ROUND_TIMEOUT_SECONDS: Final = 6 * 24 * 3600

#: The nine WM-811K wafer-map classes, in the order the synthetic generator and NPZ labels use.
WAFER_CLASSES: tuple[str, ...] = (
    "Center",
    "Donut",
    "Edge-Loc",
    "Edge-Ring",
    "Loc",
    "Near-full",
    "Random",
    "Scratch",
    "none",
)

# --------------------------------------------------------------------------------------------------
# grammars: every string from outside obeys the Kubernetes or S3 grammar of the place it goes to
#
# Each is an RE2 expression without backslashes or quotes, so that one text serves pydantic, the CRD's
# `pattern` and CEL's `matches()` (written inside a quoted CEL string).

_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
#: A DNS-1123 label: a namespace, a site, a training's metadata.name (no dots: see ObjectMeta).
DNS_LABEL = f"^{_LABEL}$"
#: A DNS-1123 subdomain: the name of a Secret, a PVC, a ServiceAccount, a PriorityClass.
DNS_SUBDOMAIN = f"^{_LABEL}([.]{_LABEL})*$"
#: A qualified name (label key, resource name, taint key): an optional DNS-subdomain prefix and "/".
QUALIFIED_NAME = f"^({_LABEL}([.]{_LABEL})*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
#: A label value (also a taint value): empty, or alphanumerics with - _ . inside.
LABEL_VALUE = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A Kubernetes quantity that is not negative: 500m, 2, 1.5, 32Gi, 1e3.
QUANTITY = "^[+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
_SAFE = "-A-Za-z0-9_+@=,~"
#: One path segment: safe characters and dots, never "." or ".." (no way up or out).
_SEGMENT = f"([{_SAFE}][{_SAFE}.]*|[.][{_SAFE}][{_SAFE}.]*|[.][.][{_SAFE}.]+)"
#: A path inside a container or a volume, from its root.
ABSOLUTE_PATH = f"^(/{_SEGMENT})+/?$"
#: A relative path that stays inside where it starts (a subPath, an object key prefix).
RELATIVE_PATH = f"^{_SEGMENT}(/{_SEGMENT})*$"
#: A path a trainer reads data from: absolute, or (in a local run) relative to the working directory.
DATA_PATH = f"^/?{_SEGMENT}(/{_SEGMENT})*/?$"
#: An S3 bucket name: 3 to 63 characters, labels of lowercase letters, digits and hyphens.
BUCKET = f"^{_LABEL}([.]{_LABEL})*$"
#: S3 refuses bucket names that read as IPv4 addresses.
IPV4 = "^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$"
#: An s3://bucket/key URI whose key has no "." or ".." segments.
S3_URI = f"^s3://{_LABEL}([.]{_LABEL})*/{_SEGMENT}(/{_SEGMENT})*$"
#: A host name or an IPv4 address (an IPv6 endpoint is written as a host name).
_HOST = "[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*"
#: An http(s) URL of a service: host, port, path; no credentials, query or fragment.
SERVICE_URL = f"^https?://{_HOST}(:[0-9]{{1,5}})?(/{_SEGMENT})*/?$"
#: An http(s) or file URL of a data file; query strings allowed (presigned URLs have them).
DATA_URL = f"^(https?://{_HOST}(:[0-9]{{1,5}})?|file://)(/{_SEGMENT})+/?([?][-A-Za-z0-9_.~%&=+/:]*)?$"
#: A timm pretrained tag: "timm/vit_small_patch14_dinov2.lvd142m" or a bare architecture tag.
HUB_TAG = "^[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?$"
#: A timm model name (a Python identifier with dots for pretrained tags).
MODEL_NAME = "^[a-z0-9][a-z0-9_.]*$"
#: A class name: an ImageFolder directory name, so one path segment of printable characters (only
#: in patterns, never in CEL: it holds backslash escapes).
_NAME_CHAR = "[^/\\x00-\\x1f\\x7f]"
_NAME_START = "[^./\\x00-\\x1f\\x7f]"
CLASS_NAME = f"^({_NAME_START}{_NAME_CHAR}*|[.]{_NAME_START}{_NAME_CHAR}*|[.][.]{_NAME_CHAR}+)$"
#: The largest integer the API server stores (int64).
INT64_MAX: Final = 2**63 - 1
#: Seeds feed NumPy and PyTorch generators, which take 32-bit seeds everywhere.
SEED_MAX: Final = 2**32 - 1
#: How large a free-form Kubernetes object (an Affinity) may be, as JSON.
MAX_OBJECT_BYTES: Final = 64 * 1024

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
QualifiedName = Annotated[str, Field(min_length=1, max_length=316, pattern=QUALIFIED_NAME)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]


def _cel_rules(*rules: dict[str, str]) -> dict[str, Any]:
    """The CRD's CEL rules for a model (fedtrain/crd.py carries them into the schema as they are).

    Each repeats a validator of the model in CEL, so that `kubectl apply` rejects what the operator
    would; `has()` guards every optional field, because the API server applies the schema's defaults
    only inside objects the user wrote. Rules that read `oldSelf` only run on updates.
    """
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API model: camelCase in YAML, unknown fields rejected (a typo is an error).

    Python code builds models by field name (`TrainingSpec(local_steps=5)`); input from outside goes
    through `parse` or `model_validate(..., by_name=False)`, which takes the camelCase names only, as
    the CRD does.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        use_enum_values=False,
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as it is written in YAML or sent to the API server (camelCase, unset omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def parse(cls, document: Any) -> Self:
        """The model of a document from outside (a file, a request body): camelCase names only."""
        return cls.model_validate(document, by_alias=True, by_name=False)


class SpecModel(ApiModel):
    """Base of the spec's models: validated as strictly as the API server validates the CRD.

    No lax conversions (`"2"` is not a number, `"true"` not a boolean, a float not an integer) and
    only finite numbers; enums still take their string values (ApiEnum).
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class ApiEnum(StrEnum):
    """An enum of the API: its string values are valid input even where the model is strict."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.enum_schema(cls, list(cls), sub_type="str", strict=False)


# --------------------------------------------------------------------------------------------------
# spec.model


class PretrainedSource(ApiEnum):
    NONE = "none"
    HUB = "hub"
    URI = "uri"
    FILE = "file"


_LOCATION_GRAMMARS: Final = {
    PretrainedSource.HUB: HUB_TAG,
    PretrainedSource.URI: S3_URI,
    PretrainedSource.FILE: ABSOLUTE_PATH,
}
_LOCATION_FORMS: Final = {
    PretrainedSource.HUB: "must be a timm pretrained tag such as timm/vit_small_patch14_dinov2.lvd142m",
    PretrainedSource.URI: "must be s3://bucket/key with no '.' or '..' in the key's path",
    PretrainedSource.FILE: "must be an absolute path with no '.' or '..' in it",
}


class Pretrained(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.source) || !(self.source in ['uri', 'file'])"
                " || (has(self.location) && size(self.location) > 0)",
                "message": "location is required when source is uri or file: set it to "
                "s3://bucket/key.safetensors (uri) or an absolute path (file)",
                "fieldPath": ".location",
                "reason": "FieldValueRequired",
            },
            {
                "rule": "!has(self.source) || self.source != 'uri'"
                " || (has(self.location) && self.location.startsWith('s3://'))",
                "message": "location must be an s3://bucket/key URI when source is uri",
                "fieldPath": ".location",
            },
            {
                "rule": "!has(self.location) || size(self.location) == 0"
                " || (has(self.source) && self.source != 'none')",
                "message": "location is set but source is none: set source to hub, uri or file",
                "fieldPath": ".location",
            },
            *(
                {
                    "rule": f"!has(self.source) || self.source != '{source.value}' || !has(self.location)"
                    f" || self.location.matches('{grammar}')",
                    "message": f"location {_LOCATION_FORMS[source]}",
                    "fieldPath": ".location",
                }
                for source, grammar in _LOCATION_GRAMMARS.items()
            ),
        )
    )

    source: PretrainedSource = Field(
        PretrainedSource.NONE,
        description=(
            "Where the base weights come from: none (random initialisation from the training seed), "
            "hub (timm's pretrained weights from the Hugging Face hub), uri (a safetensors file in "
            "the object store, s3://bucket/key), or file (a safetensors file on the trainer's disk)."
        ),
    )
    location: str | None = Field(
        None,
        max_length=1024,
        description=(
            "For hub: a timm pretrained tag such as 'timm/vit_small_patch14_dinov2.lvd142m' (omit for "
            "timm's default tag). For uri: s3://bucket/key.safetensors. For file: an absolute path."
        ),
    )

    @model_validator(mode="after")
    def _location_matches_source(self) -> Pretrained:
        if self.source in (PretrainedSource.URI, PretrainedSource.FILE) and not self.location:
            raise ValueError(f"location is required when source is {self.source.value}")
        if self.source is PretrainedSource.URI and not (self.location or "").startswith("s3://"):
            raise ValueError("location must be an s3://bucket/key URI when source is uri")
        if self.source is PretrainedSource.NONE and self.location:
            raise ValueError("location is set but source is none: set source to hub, uri or file")
        grammar = _LOCATION_GRAMMARS.get(self.source)
        if grammar and self.location and not re.fullmatch(grammar, self.location):
            raise ValueError(f"location {_LOCATION_FORMS[self.source]}")
        return self


class Architecture(SpecModel):
    """Overrides of the named timm architecture, for small experiments and tests."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.embedDim) || !has(self.numHeads) || self.embedDim % self.numHeads == 0",
                "message": "embedDim must be divisible by numHeads: change one of them",
                "messageExpression": "'embedDim ' + string(self.embedDim) + ' is not divisible by numHeads '"
                " + string(self.numHeads) + ': change one of them'",
                "fieldPath": ".embedDim",
            },
        )
    )

    depth: int | None = Field(None, ge=1, le=64, description="Number of transformer blocks.")
    embed_dim: int | None = Field(None, ge=8, le=4096, description="Token embedding width.")
    num_heads: int | None = Field(None, ge=1, le=64, description="Attention heads per block.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Architecture:
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(f"embedDim {self.embed_dim} is not divisible by numHeads {self.num_heads}")
        return self

    def timm_kwargs(self) -> dict[str, int]:
        names = {"depth": self.depth, "embed_dim": self.embed_dim, "num_heads": self.num_heads}
        return {key: value for key, value in names.items() if value is not None}


class ModelSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "has(self.numClasses) || has(self.labels)",
                "message": "set numClasses or labels",
                "reason": "FieldValueRequired",
            },
            {
                "rule": "!has(self.numClasses) || !has(self.labels) || self.numClasses == size(self.labels)",
                "message": "numClasses differs from the number of labels: make them agree or drop numClasses",
                "messageExpression": "'numClasses is ' + string(self.numClasses) + ' but labels has '"
                " + string(size(self.labels)) + ' names: make them agree or drop numClasses'",
                "fieldPath": ".numClasses",
            },
        )
    )

    name: str = Field(
        "vit_small_patch14_dinov2",
        min_length=1,
        max_length=128,
        pattern=MODEL_NAME,
        description="timm model name, e.g. vit_small_patch14_dinov2 or vit_base_patch14_dinov2.",
    )
    pretrained: Pretrained = Field(
        default_factory=Pretrained, description="Where the base weights come from."
    )
    num_classes: int | None = Field(
        None, ge=2, le=100000, description="Number of classes; may be omitted when labels is set."
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=128, pattern=CLASS_NAME)]] | None = Field(
        None,
        min_length=2,
        max_length=1000,
        description=(
            "Class names in label order; ImageFolder directories are matched to these names, so each "
            "is a directory name (no '/', not '.' or '..', at most 128 characters)."
        ),
    )
    image_size: int = Field(224, ge=8, le=2048, description="Square input size in pixels.")
    architecture: Architecture | None = Field(
        None, description="Overrides of the named architecture (depth, embedDim, numHeads)."
    )

    @model_validator(mode="after")
    def _classes_known(self) -> ModelSpec:
        if self.labels is None and self.num_classes is None:
            raise ValueError("set numClasses or labels")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be unique")
            if self.num_classes is not None and self.num_classes != len(self.labels):
                raise ValueError(f"numClasses is {self.num_classes} but labels has {len(self.labels)} names")
        return self

    @property
    def class_count(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        assert self.num_classes is not None  # guaranteed by _classes_known
        return self.num_classes

    def class_names(self) -> list[str]:
        return list(self.labels) if self.labels else [str(index) for index in range(self.class_count)]


# --------------------------------------------------------------------------------------------------
# spec.lora


#: A module name or suffix of a torch model ("qkv", "blocks.0.attn"), or "all-linear".
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern="^[-A-Za-z0-9_.*]+$")]


class LoraAggregation(ApiEnum):
    NAIVE = "naive"
    FROZEN_A = "frozenA"
    PRODUCT = "product"


class LoraSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.rank) || type(self.rank) != int || (self.rank >= 1 && self.rank <= 1024)",
                "message": "rank must be between 1 and 1024, or none, or auto",
                "fieldPath": ".rank",
            },
        )
    )

    rank: Annotated[
        int | Literal["none", "auto"],
        WrapValidator(_one_message("must be an integer from 1 to 1024, or 'none' or 'auto'")),
    ] = Field(
        "auto",
        description=(
            "LoRA rank: an integer, none (full fine-tuning), or auto (by model size: under 20M "
            "parameters full fine-tuning; 20-100M rank 8; 100-400M rank 16; larger rank 32)."
        ),
    )
    alpha: int | None = Field(None, ge=1, le=4096, description="LoRA scaling alpha; defaults to 2 x rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description=(
            "Module names (or suffixes) to adapt; 'all-linear' adapts every Linear layer except the "
            "classifier head, which is always trained fully."
        ),
    )

    aggregation: LoraAggregation = Field(
        LoraAggregation.NAIVE,
        description=(
            "How LoRA adapters federate. naive: A and B are trained and averaged each on its own "
            "(the mean of B times the mean of A is not the mean of the sites' B times A). frozenA "
            "(FFA-LoRA, Sun et al. 2024): A stays at its seeded initialisation, the same at every site, "
            "and only B (and the head) is trained and exchanged, so averaging B averages the sites' "
            "weight changes exactly. product (FlexLoRA, Bai et al. 2024): the aggregator averages the "
            "sites' weight changes s·B_i·A_i per adapted layer (weighted as aggregation.weighting says) "
            "and factorises the mean back to the rank by truncated SVD, so the next global A and B "
            "give the best rank-r approximation of the mean change; the round manifest records the "
            "energy each layer's truncation kept. product needs aggregation.strategy fedavg and an "
            "exchange that shares both factors of every adapted layer. None takes effect under rank "
            "none."
        ),
    )

    @model_validator(mode="after")
    def _rank_positive(self) -> LoraSpec:
        if isinstance(self.rank, int) and not 1 <= self.rank <= 1024:
            raise ValueError("rank must be between 1 and 1024, or none, or auto")
        return self


# --------------------------------------------------------------------------------------------------
# spec.exchange

#: A glob over parameter names: fnmatch's `*`, `?` and `[...]`, over the characters of a name
#: (only in patterns, never in CEL: it holds backslash escapes).
LAYER_PATTERN = "^[-A-Za-z0-9_.*?\\[\\]]+$"
#: A torch module type name: a Python identifier ("LayerNorm", "BatchNorm2d").
MODULE_TYPE = "^[A-Za-z_][A-Za-z0-9_]*$"
#: How many patterns or module types one exchange block may list.
MAX_EXCHANGE_ENTRIES: Final = 64

LayerPattern = Annotated[str, Field(min_length=1, max_length=256, pattern=LAYER_PATTERN)]
ModuleType = Annotated[str, Field(min_length=1, max_length=128, pattern=MODULE_TYPE)]


class ExchangePolicy(ApiEnum):
    ALL = "all"
    FIXED = "fixed"
    EXCLUDE = "exclude"
    DYNAMIC = "dynamic"
    SPARSE = "sparse"


class ExchangeSpec(SpecModel):
    """Which trainable tensors leave a site each round; the rest stay in the site's private state."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "(has(self.layers) || has(self.modules)) ? (has(self.policy)"
                " && (self.policy == 'fixed' || self.policy == 'exclude')) : true",
                "message": "layers and modules belong to policies fixed and exclude: drop them, or "
                "choose policy fixed or exclude",
            },
            {
                "rule": "!has(self.policy) || self.policy != 'fixed'"
                " || (has(self.layers) && !has(self.modules))",
                "message": "policy fixed needs layers (the patterns of the tensors exchanged) and takes "
                "no modules: set layers, or use policy exclude to keep module types local",
                "fieldPath": ".layers",
                "reason": "FieldValueRequired",
            },
            {
                "rule": "!has(self.policy) || self.policy != 'exclude'"
                " || has(self.layers) || has(self.modules)",
                "message": "policy exclude needs layers or modules (what stays local): set one of them",
                "reason": "FieldValueRequired",
            },
            {
                "rule": "has(self.policy) && self.policy == 'dynamic'"
                " ? has(self.topFraction) != has(self.threshold)"
                " : !has(self.topFraction) && !has(self.threshold)",
                "message": "policy dynamic takes exactly one of topFraction and threshold, and no other "
                "policy takes either: topFraction is the share of tensors sent each round (e.g. 0.25), "
                "threshold the share of the largest drift a tensor must reach (e.g. 0.1)",
            },
            {
                "rule": "has(self.policy) && self.policy == 'sparse' ? has(self.topK) : !has(self.topK)",
                "message": "topK belongs to policy sparse, which needs it and no other policy takes: "
                "the share of each tensor's elements sent each round (e.g. 0.05)",
                "fieldPath": ".topK",
            },
            {
                "rule": "!has(self.siteModels) || !self.siteModels"
                " || (has(self.policy) && (self.policy == 'fixed' || self.policy == 'exclude'))",
                "message": "siteModels publishes each site's personal layers, which only policies fixed "
                "and exclude keep: drop siteModels or choose policy fixed or exclude",
                "fieldPath": ".siteModels",
            },
        )
    )

    policy: ExchangePolicy = Field(
        ExchangePolicy.ALL,
        description=(
            "all: every trainable tensor leaves the site (the LoRA matrices and the head, or every "
            "tensor under full fine-tuning); fixed: only the trainable tensors matching layers leave "
            "it; exclude: the trainable tensors matching layers, and those of modules of the types "
            "in modules, never leave the site and persist in its private state (personal layers: "
            "FedPer keeps the head, FedBN the normalisation layers); dynamic: each round a site sends "
            "only the trainable tensors that drifted most from the global model it received (root "
            "mean square change, by topFraction or threshold) and the aggregator averages each tensor "
            "over the sites that sent it; sparse: each round a site sends the topK largest elements "
            "of each tensor's change as indices and values, and carries what it did not send into "
            "the next round (error feedback, kept in its private state). Frozen base weights never "
            "move."
        ),
    )
    layers: list[LayerPattern] | None = Field(
        None,
        min_length=1,
        max_length=MAX_EXCHANGE_ENTRIES,
        description=(
            "Glob patterns (*, ?, [...]) over timm parameter names: the names of the tensors in the "
            "global model without peft's 'base_model.model.' prefix and '.modules_to_save.default' "
            "part, e.g. 'head.*' (the classifier), 'blocks.*.attn.qkv.lora_*', 'blocks.0.norm1.weight'. "
            "fixed: the tensors exchanged; exclude: tensors kept local. Each pattern must match a "
            "trainable tensor."
        ),
    )
    modules: list[ModuleType] | None = Field(
        None,
        min_length=1,
        max_length=MAX_EXCHANGE_ENTRIES,
        description=(
            "exclude only: module class names (e.g. LayerNorm, BatchNorm2d) whose own trainable "
            "parameters stay local; each must own a trainable parameter (under LoRA the base "
            "model's normalisation layers are frozen: use lora.rank none to make them trainable)."
        ),
    )
    top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "dynamic only: the share of the trainable tensors each site sends each round, those that "
            "drifted most from the global model it received, drift being the root mean square of a "
            "tensor's change (at least one tensor; 0.25 sends the quarter that moved most)."
        ),
    )
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "dynamic only: send each trainable tensor whose drift (the root mean square of its change "
            "since the global model received) is at least this share of the round's largest drift: "
            "1 sends the most drifted tensor alone, 0.1 every tensor within a factor of 10 of it."
        ),
    )
    top_k: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "sparse only: the share of each tensor's elements sent each round (the largest in "
            "magnitude of the change plus what earlier rounds did not send; at least one element "
            "per tensor). 0.05 sends 5 % of the values, each with its int32 index."
        ),
    )
    site_models: bool = Field(
        False,
        description=(
            "Opt-in. true: in the final evaluation each site writes its own merged model (the global "
            "shared tensors with its personal ones, LoRA folded in, loadable by timm without peft) "
            "to the training's bucket, sites/<site>/model-merged.safetensors, and status.siteModelUris "
            "lists them. Those objects leave the site's private domain: anyone who may read the "
            "bucket reads each site's personal layers. false (the default): personal layers never "
            "leave the site, and the merged global model holds their initial values. Needs policy "
            "fixed or exclude."
        ),
    )

    @model_validator(mode="after")
    def _fields_fit_policy(self) -> ExchangeSpec:
        policy = self.policy
        if (self.layers or self.modules) and policy not in (ExchangePolicy.FIXED, ExchangePolicy.EXCLUDE):
            raise ValueError(
                f"policy {policy.value} takes neither layers nor modules (they belong to policies fixed "
                "and exclude): drop them, or choose policy fixed or exclude"
            )
        if policy is ExchangePolicy.FIXED and (not self.layers or self.modules):
            raise ValueError(
                "policy fixed needs layers (the patterns of the tensors exchanged) and takes no "
                "modules: set layers, or use policy exclude to keep module types local"
            )
        if policy is ExchangePolicy.EXCLUDE and not (self.layers or self.modules):
            raise ValueError("policy exclude needs layers or modules (what stays local): set one of them")
        self._check_selection_fields()
        if self.site_models and not self.has_personal:
            raise ValueError(
                "siteModels publishes each site's personal layers, which only policies fixed and "
                f"exclude keep (policy {policy.value} keeps none): drop siteModels or choose policy "
                "fixed or exclude"
            )
        return self

    def _check_selection_fields(self) -> None:
        dynamic, sparse = self.policy is ExchangePolicy.DYNAMIC, self.policy is ExchangePolicy.SPARSE
        chosen = (self.top_fraction is not None) + (self.threshold is not None)
        if chosen != (1 if dynamic else 0):
            raise ValueError(
                "policy dynamic takes exactly one of topFraction and threshold, and no other policy takes "
                f"either (policy {self.policy.value} has {chosen}): topFraction is the share of tensors "
                "sent each round (e.g. 0.25), threshold the share of the largest drift a tensor must reach "
                "(e.g. 0.1)"
            )
        if sparse != (self.top_k is not None):
            raise ValueError(
                "topK belongs to policy sparse, which needs it and no other policy takes (policy "
                f"{self.policy.value}): the share of each tensor's elements sent each round (e.g. 0.05)"
            )

    def tensors_sent(self, tensor_count: int) -> int | None:
        """dynamic with topFraction: how many of `tensor_count` tensors a site sends (at least one);
        None where any number may go (threshold, and every other policy sends them all)."""
        if self.top_fraction is None:
            return None
        return min(tensor_count, max(1, math.ceil(round(self.top_fraction * tensor_count, 9))))

    def elements_sent(self, numel: int) -> int:
        """sparse: how many of a tensor's `numel` elements a site sends each round (at least one)."""
        if self.top_k is None:
            return numel
        return min(numel, max(1, math.ceil(round(self.top_k * numel, 9))))

    @property
    def has_personal(self) -> bool:
        """Whether some trainable tensors stay at the site (fixed and exclude): dynamic and sparse
        choose among all of them each round and keep none personal."""
        return self.policy in (ExchangePolicy.FIXED, ExchangePolicy.EXCLUDE)


class TrainingMode(ApiEnum):
    FEDERATED = "federated"
    LOCAL_ONLY = "localOnly"


def keeps_personal(mode: TrainingMode, exchange: ExchangeSpec) -> bool:
    """Whether a site keeps trainable tensors in its private state: localOnly keeps them all."""
    return mode is TrainingMode.LOCAL_ONLY or exchange.has_personal


def publishes_site_models(mode: TrainingMode, exchange: ExchangeSpec) -> bool:
    """Whether each site writes its own merged model in the final evaluation: localOnly always
    (a site's own model is the only final model it has), otherwise when exchange.siteModels opts in."""
    return mode is TrainingMode.LOCAL_ONLY or exchange.site_models


# --------------------------------------------------------------------------------------------------
# spec.training


class OptimizerName(ApiEnum):
    ADAMW = "adamw"
    SGD = "sgd"


class Optimizer(SpecModel):
    name: OptimizerName = Field(OptimizerName.ADAMW, description="adamw or sgd.")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")


class ScheduleName(ApiEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class LrSchedule(SpecModel):
    name: ScheduleName = Field(
        ScheduleName.COSINE,
        description="constant, or cosine decay over all rounds' local steps of a site.",
    )
    warmup_steps: int = Field(
        0, ge=0, le=10_000_000, description="Linear warm-up steps at the start of training."
    )
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="Cosine floor as a fraction of lr.")


class Precision(ApiEnum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class TransferDtype(ApiEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"


class Augmentation(ApiEnum):
    """How training images are augmented; only choices that keep every label of their kind of data."""

    NONE = "none"
    WAFER_MAP = "waferMap"

    def __bool__(self) -> bool:
        # `if training.augment:` reads as "augments at all", as the boolean it replaced did.
        return self is not Augmentation.NONE


class TrainingSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.localEpochs) || !has(self.localSteps)",
                "message": "set localEpochs or localSteps, not both: remove one of them",
                "fieldPath": ".localSteps",
                "reason": "FieldValueForbidden",
            },
        )
    )

    rounds: int = Field(10, ge=1, le=10000, description="Federated rounds to run.")
    local_epochs: float | None = Field(
        None, gt=0, le=1000, description="Local epochs per round (set this or localSteps; default 1)."
    )
    local_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Local optimizer steps per round (instead of localEpochs)."
    )
    batch_size: int = Field(32, ge=1, le=65536, description="Local batch size.")
    optimizer: Optimizer = Field(default_factory=Optimizer, description="Local optimizer.")
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule, description="Learning-rate schedule.")
    seed: int = Field(
        0, ge=0, le=SEED_MAX, description="Seed of model initialisation, site selection and data order."
    )
    precision: Precision = Field(
        Precision.AUTO, description="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16."
    )
    grad_clip_norm: float | None = Field(1.0, gt=0, le=1e6, description="Clip gradients to this L2 norm.")
    proximal_mu: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description=(
            "FedProx (Li et al. 2020): mu/2 times the squared distance of the shared (exchanged) "
            "tensors from the global model the site received is added to each step's loss, pulling "
            "local training back towards it on non-IID data (personal tensors have no global value and "
            "get no pull). 0 (the default) is plain local training."
        ),
    )
    transfer_dtype: TransferDtype = Field(
        TransferDtype.FP32,
        description=(
            "dtype of what crosses the network: fp32, bf16, fp16 or int8. Updates are sent in it; global "
            "models go to the sites in it too (bf16 with int8). int8 stores each floating tensor of an "
            "update as int8 plus float32 absmax scales, one per row (one per column for matrices taller "
            "than wide, such as LoRA B; one per 1-D tensor), each value rounded to the nearest multiple "
            "of its scale (absmax/127), an error of at most half a scale; updates are dequantised to fp32 "
            "before they are folded. Global models are not sent in int8: their weights are large beside "
            "one round's change, and an error of half a scale on every weight, every round, would swamp "
            "the updates. The aggregator keeps its own fp32 copy of each global model, and the merged "
            "final model is fp32 whatever this is."
        ),
    )
    augment: Augmentation = Field(
        Augmentation.NONE,
        description=(
            "Augmentation of training images: none (the default: every label stays true), or waferMap "
            "(random flips and 90-degree rotations, for images whose class does not depend on "
            "orientation, such as wafer maps; they change the label of digits, text and most photos)."
        ),
    )

    @model_validator(mode="after")
    def _epochs_xor_steps(self) -> TrainingSpec:
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("set localEpochs or localSteps, not both")
        return self

    @property
    def epochs_per_round(self) -> float | None:
        if self.local_steps is not None:
            return None
        return self.local_epochs if self.local_epochs is not None else 1.0


# --------------------------------------------------------------------------------------------------
# spec.aggregation and spec.evaluation


class StrategyName(ApiEnum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmedMean"
    KRUM = "krum"
    MULTI_KRUM = "multiKrum"


#: Strategies that step a server optimizer with the round's mean update (Reddi et al. 2021).
SERVER_OPTIMIZERS: Final = frozenset(
    {StrategyName.FEDAVGM, StrategyName.FEDADAM, StrategyName.FEDYOGI, StrategyName.FEDADAGRAD}
)
KRUMS: Final = (StrategyName.KRUM, StrategyName.MULTI_KRUM)
#: Strategies that need every update of a round at once (tensor by tensor from the store).
ROBUST_STRATEGIES: Final = frozenset(
    {StrategyName.MEDIAN, StrategyName.TRIMMED_MEAN, StrategyName.KRUM, StrategyName.MULTI_KRUM}
)


class ControlVariates(ApiEnum):
    NONE = "none"
    SCAFFOLD = "scaffold"


class ServerOptimizerSpec(SpecModel):
    """The server optimizer's settings (Reddi et al., "Adaptive Federated Optimization", 2021)."""

    learning_rate: float | None = Field(
        None,
        gt=0,
        le=100,
        description=(
            "Server learning rate eta: the next model is the current one plus eta times the step. "
            "Default 1.0 for fedavgm, 0.1 for fedadam, fedyogi and fedadagrad."
        ),
    )
    momentum: float = Field(
        0.9, ge=0, lt=1, description="fedavgm: server momentum beta (m = beta m + mean update)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="fedadam, fedyogi, fedadagrad: first-moment decay.")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam, fedyogi: second-moment decay.")
    tau: float = Field(
        1e-3,
        gt=0,
        le=10,
        description="fedadam, fedyogi, fedadagrad: adaptivity tau (added to sqrt(v); v starts at tau^2).",
    )


class RobustSpec(SpecModel):
    """Settings of the robust strategies, which look at every update of a round together."""

    trim_fraction: float | None = Field(
        None,
        ge=0,
        lt=0.5,
        description=(
            "trimmedMean: the share of sites dropped at each end of every coordinate before averaging "
            "(floor(share x sites) per side; default 0.2, which trims one of 5 to 9 sites at each end; "
            "with fewer than 1 / share sites nothing is trimmed)."
        ),
    )
    byzantine: int | None = Field(
        None,
        ge=0,
        le=127,
        description=(
            "krum, multiKrum: f, the number of faulty sites to tolerate; a round needs more than "
            "2f + 2 accepted updates (aggregation.minSites must say so)."
        ),
    )
    select: int | None = Field(
        None,
        ge=1,
        le=256,
        description="multiKrum: how many of the best-scored updates are averaged (default: sites - f).",
    )

    def check_fits(self, strategy: StrategyName) -> None:
        """ValueError unless every setting given belongs to `strategy`."""
        if strategy not in (StrategyName.TRIMMED_MEAN, *KRUMS):
            raise ValueError(
                f"robust configures trimmedMean, krum or multiKrum, not {strategy.value}: choose one "
                "of them, or drop robust"
            )
        if self.trim_fraction is not None and strategy is not StrategyName.TRIMMED_MEAN:
            raise ValueError("robust.trimFraction belongs to strategy trimmedMean: drop it")
        if self.byzantine is not None and strategy not in KRUMS:
            raise ValueError("robust.byzantine belongs to strategies krum and multiKrum: drop it")
        if self.select is not None and strategy is not StrategyName.MULTI_KRUM:
            raise ValueError("robust.select belongs to strategy multiKrum: drop it")


class Weighting(ApiEnum):
    SAMPLES = "samples"
    UNIFORM = "uniform"
    EXPLICIT = "explicit"


class AggregationSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.server) || (has(self.strategy) && self.strategy in "
                "['fedavgm', 'fedadam', 'fedyogi', 'fedadagrad'])",
                "message": "server configures a server optimizer: choose strategy fedavgm, fedadam, "
                "fedyogi or fedadagrad, or drop server",
                "fieldPath": ".server",
            },
            {
                "rule": "!has(self.robust) || (has(self.strategy) && self.strategy in "
                "['trimmedMean', 'krum', 'multiKrum'])",
                "message": "robust configures trimmedMean, krum or multiKrum: choose one of them, or "
                "drop robust",
                "fieldPath": ".robust",
            },
            {
                "rule": "!has(self.controlVariates) || self.controlVariates != 'scaffold'"
                " || !has(self.strategy)"
                " || !(self.strategy in ['median', 'trimmedMean', 'krum', 'multiKrum'])",
                "message": "controlVariates scaffold averages the sites' control changes, which robust "
                "strategies would not: choose fedavg or a server optimizer, or drop controlVariates",
                "fieldPath": ".controlVariates",
            },
            {
                "rule": "!has(self.robust) || !has(self.robust.trimFraction)"
                " || (has(self.strategy) && self.strategy == 'trimmedMean')",
                "message": "robust.trimFraction belongs to strategy trimmedMean: drop it",
                "fieldPath": ".robust.trimFraction",
            },
            {
                "rule": "!has(self.robust) || !has(self.robust.byzantine)"
                " || (has(self.strategy) && self.strategy in ['krum', 'multiKrum'])",
                "message": "robust.byzantine belongs to strategies krum and multiKrum: drop it",
                "fieldPath": ".robust.byzantine",
            },
            {
                "rule": "!has(self.robust) || !has(self.robust.select)"
                " || (has(self.strategy) && self.strategy == 'multiKrum')",
                "message": "robust.select belongs to strategy multiKrum: drop it",
                "fieldPath": ".robust.select",
            },
            {
                "rule": "!has(self.strategy) || !(self.strategy in ['krum', 'multiKrum'])"
                " || (has(self.robust) && has(self.robust.byzantine)"
                " && has(self.minSites) && self.minSites > 2 * self.robust.byzantine + 2)",
                "message": "krum and multiKrum need robust.byzantine (f) and minSites above 2f + 2, so "
                "that every round they run on has enough honest updates: set both",
                "fieldPath": ".robust",
            },
        )
    )

    strategy: StrategyName = Field(
        StrategyName.FEDAVG,
        description=(
            "How the sites' updates become the next model. fedavg: their weighted mean. fedavgm, "
            "fedadam, fedyogi, fedadagrad: a server optimizer stepped with that mean (settings in "
            "server; its state is kept in the store per round). median: the coordinate-wise median; "
            "trimmedMean: the coordinate-wise mean without the robust.trimFraction largest and "
            "smallest; krum: the update closest to its n - f - 2 nearest others; multiKrum: the mean "
            "of the robust.select best by that score (robust.byzantine is f). The robust ones are "
            "unweighted and read every update of a round again, tensor by tensor, when it closes."
        ),
    )
    server: ServerOptimizerSpec | None = Field(
        None, description="Server optimizer settings (fedavgm, fedadam, fedyogi, fedadagrad only)."
    )
    control_variates: ControlVariates = Field(
        ControlVariates.NONE,
        description=(
            "scaffold: SCAFFOLD (Karimireddy et al. 2020) corrects client drift on non-IID data. The "
            "aggregator keeps a server control variate c (rounds/NNNNN/control.safetensors), each site "
            "its own c_i in its private state; every local step's gradient of a shared tensor gets "
            "c - c_i added; after the round c_i becomes c_i - c + (x - y) / (sum of the learning rates "
            "of its steps) (the paper's option II), the site sends the change of c_i beside its update, "
            "and c moves by the mean change times the share of sites that sent one. Exact as in the "
            "paper for SGD without momentum. Not with robust strategies, exchange policies dynamic or "
            "sparse, transferDtype int8, or mode localOnly."
        ),
    )
    robust: RobustSpec | None = Field(
        None, description="Robust aggregation settings (trimmedMean, krum, multiKrum only)."
    )
    weighting: Weighting = Field(
        Weighting.SAMPLES,
        description="samples (by training samples), uniform, or explicit (each site's weight).",
    )
    min_sites: int = Field(
        1, ge=1, le=256, description="Accepted updates a round needs to close; fewer fails the training."
    )
    round_timeout_seconds: int = Field(
        3600,
        ge=1,
        le=MAX_ROUND_TIMEOUT_SECONDS,
        description=(
            "Seconds after a round starts when unfinished sites become stragglers; at most 6 days "
            "(518400): a site's presigned URLs must outlive the round, S3 lets them live at most 7 days, "
            "and the operator's grace (presignGraceSeconds) takes the rest."
        ),
    )
    site_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of sites selected per round (seeded, at least minSites)."
    )
    site_retries: int = Field(1, ge=0, le=10, description="New attempts for a site whose trainer failed.")
    wait_timeout_seconds: int = Field(
        900,
        ge=10,
        le=86400,
        description=(
            "How long the training may wait on something that should pass with time (the aggregator "
            "starting, the object store or a credentials Secret unreachable) before it fails with the "
            "condition Waiting's reason; the wait is shown in the Waiting condition meanwhile."
        ),
    )
    max_update_norm: float | None = Field(
        None, gt=0, le=1e12, description="Reject updates whose L2 norm exceeds this bound."
    )

    @model_validator(mode="after")
    def _settings_fit_strategy(self) -> AggregationSpec:
        strategy = self.strategy
        if self.server is not None and strategy not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server configures a server optimizer, and strategy {strategy.value} has none: choose "
                "strategy fedavgm, fedadam, fedyogi or fedadagrad, or drop server"
            )
        if self.robust is not None:
            self.robust.check_fits(strategy)
        if self.control_variates is ControlVariates.SCAFFOLD and strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"controlVariates scaffold averages the sites' control changes, which strategy "
                f"{strategy.value} would not: choose fedavg or a server optimizer, or drop controlVariates"
            )
        if strategy in KRUMS:
            f = self.robust.byzantine if self.robust is not None else None
            if f is None or self.min_sites <= 2 * f + 2:
                raise ValueError(
                    "krum and multiKrum need robust.byzantine (f) and minSites above 2f + 2, so that "
                    f"every round they run on has enough honest updates (minSites is {self.min_sites}, "
                    f"f is {f}): set both"
                )
        return self

    @property
    def scaffold(self) -> bool:
        return self.control_variates is ControlVariates.SCAFFOLD

    @property
    def server_optimizer(self) -> ServerOptimizerSpec:
        return self.server or ServerOptimizerSpec()

    @property
    def robust_settings(self) -> RobustSpec:
        return self.robust or RobustSpec()

    def sites_per_round(self, site_count: int) -> int:
        return min(site_count, max(self.min_sites, math.ceil(self.site_fraction * site_count)))


class MetricName(ApiEnum):
    ACCURACY = "accuracy"
    MACRO_F1 = "macroF1"
    LOSS = "loss"


class UncertaintyMethod(ApiEnum):
    NONE = "none"
    MC_DROPOUT = "mcDropout"
    SWAG = "swag"


#: SWAG: the most deviation rows a SWAG model keeps (a site sends swagRank + 1 a round).
MAX_SWAG_RANK: Final = 32


class UncertaintySpec(SpecModel):
    method: UncertaintyMethod = Field(
        UncertaintyMethod.NONE,
        description=(
            "none, mcDropout or swag. mcDropout: in the final evaluation each site also scores the final "
            "model with dropout kept on (every dropout layer at `dropout`), averaging the class "
            "probabilities of `samples` passes, on its test split. swag (SWAG, Maddox et al. 2019): in "
            "the last `swagRounds` training rounds each site takes swagRank + 1 snapshots of the "
            "exchanged tensors over the second half of its local steps and sends their mean, mean of "
            "squares and deviations beside its update; the aggregator combines them weighted like the "
            "updates into a Gaussian (diagonal plus rank swagRank) over the exchanged tensors; the "
            "final evaluation averages `samples` draws from it, and the training exports it "
            "(status.swagModelUri, model-swag.safetensors for fedtrain predict). Either way "
            "status.testUncertainty sits beside status.testEvaluation."
        ),
    )
    samples: int = Field(
        20,
        ge=2,
        le=1000,
        description="mcDropout: stochastic passes averaged per image; swag: draws averaged.",
    )
    dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="mcDropout: the rate every dropout layer drops at test time (0: the plain model).",
    )
    swag_rank: int = Field(
        5,
        ge=1,
        le=MAX_SWAG_RANK,
        description=(
            "swag: rows of the low-rank deviation matrix (the covariance's rank beyond its diagonal). A "
            "site sends about (swagRank + 3) times the update's fp32 size in each SWAG round; the exported "
            "model carries (swagRank + 2) copies of the exchanged tensors."
        ),
    )
    swag_rounds: int = Field(
        2,
        ge=1,
        le=10000,
        description=(
            "swag: the last training rounds whose local steps are sampled (each round weighs the same; "
            "at most training.rounds)."
        ),
    )

    def collects_swag(self, round_index: int, rounds: int) -> bool:
        """Whether the sites of training round `round_index` send SWAG moments."""
        return self.method is UncertaintyMethod.SWAG and rounds - self.swag_rounds <= round_index < rounds


#: Cross-site validation scores N models at N sites: its matrix lives in the status.
MAX_CROSS_SITE_SITES: Final = 32
#: The final global model's column of the cross-site matrix: no site name (a DNS label) can be it.
GLOBAL_MODEL_KEY: Final = "(global)"


class EvaluationSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "(has(self.valFraction) ? self.valFraction : 0.2)"
                " + (has(self.testFraction) ? self.testFraction : 0.0) < 1.0",
                "message": "evaluation.valFraction plus testFraction must be below 1: lower one of "
                "them so that data is left to train on",
            },
            {
                "rule": "!has(self.every) || self.every != 0 || !has(self.patience)",
                "message": "evaluation.patience needs evaluations during training: evaluation.every 0 "
                "scores only the final model; set every to 1 or more, or drop patience",
                "fieldPath": ".every",
            },
        )
    )

    metric: MetricName = Field(
        MetricName.ACCURACY, description="Metric that picks the best round: accuracy, macroF1 or loss."
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=10000,
        description=(
            "Stop after this many evaluations without improvement (unset: never); an evaluation is a "
            "round that evaluation.every scores, so with every 1 a round."
        ),
    )
    min_delta: float = Field(0.0, ge=0, le=1e6, description="Smallest change that counts as an improvement.")
    val_fraction: float = Field(
        0.2, gt=0, lt=1, description="Fraction of each site's data held out for validation."
    )
    test_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "Fraction of each site's data held out for testing (0: no test split). The test split is "
            "drawn from the same seeded shuffle as the validation split, disjoint from it and from the "
            "training data; it never picks the best round or stops early: only the final evaluation "
            "scores the final model on it (status.testEvaluation). Off by default so that a running "
            "training's validation split never changes under an upgrade."
        ),
    )
    cross_site: bool = Field(
        False,
        description=(
            "Cross-site validation: in the final evaluation every site also scores each site's last "
            "local model (the last training round's global model plus that site's update, as the "
            "aggregator rebuilds it) on its own test split, beside the final global model: an N x (N + "
            "1) matrix (status.crossSiteAccuracy, the final record's crossSite). Sites receive the "
            f"other sites' models, never their data. Needs testFraction, exchange policy all, mode "
            f"federated, at most {MAX_CROSS_SITE_SITES} sites, and neither secure aggregation (it hides "
            "each site's update) nor storage.retention.deleteUpdates nor sites[].loraRank."
        ),
    )
    uncertainty: UncertaintySpec = Field(
        default_factory=UncertaintySpec,
        description="How sure the final model is, scored on the test splits (needs testFraction).",
    )
    every: int = Field(
        1,
        ge=0,
        le=10000,
        description=(
            "Score the global model on the sites' validation splits every this many rounds (rounds "
            "0, k, 2k, ...); 0: only in the final evaluation. The final model is always scored. Fewer "
            "evaluations cost less and give the best round and early stopping fewer candidates."
        ),
    )

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> EvaluationSpec:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"evaluation.valFraction ({self.val_fraction}) plus testFraction ({self.test_fraction}) "
                "must be below 1: lower one of them so that data is left to train on"
            )
        if self.uncertainty.method is not UncertaintyMethod.NONE and self.test_fraction == 0:
            raise ValueError(
                "evaluation.uncertainty is scored on the test splits: set evaluation.testFraction "
                "(e.g. 0.2) or drop uncertainty"
            )
        if self.every == 0 and self.patience is not None:
            raise ValueError(
                "evaluation.patience needs evaluations during training: evaluation.every 0 scores only "
                "the final model; set every to 1 or more, or drop patience"
            )
        return self

    def scores(self, round_index: int, rounds: int) -> bool:
        """Whether the sites score the global model of `round_index` on their validation splits:
        every `every` rounds, and always the final model (round `rounds`)."""
        if round_index >= rounds:
            return True
        return self.every > 0 and round_index % self.every == 0

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        if self.metric is MetricName.LOSS:
            return value < best - self.min_delta
        return value > best + self.min_delta


# --------------------------------------------------------------------------------------------------
# spec.privacy


class DpSpec(SpecModel):
    """Client-level differential privacy: DP-FedAvg (McMahan et al. 2018)."""

    noise_multiplier: float = Field(
        ...,
        gt=0,
        le=100,
        description=(
            "sigma: the aggregator adds Gaussian noise of standard deviation sigma x privacy.clipNorm to "
            "the sum of the clipped updates of a round, which it then divides by the number of sites a "
            "round selects (a fixed denominator, so one site changes the mean by at most clipNorm / "
            "that number). Larger: more privacy (smaller epsilon per round), noisier models."
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="delta of the (epsilon, delta) guarantee; well below 1 / the number of sites.",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=(
            "The privacy budget: the training stops (the final evaluation runs, the condition "
            "PrivacyBudget says why) before a round would take epsilon at delta above it. Unset: "
            "epsilon is reported after each round and never stops the training."
        ),
    )


#: Where adaptive clipping writes the next round's clip: the next global model's metadata config.
CLIP_CONFIG_KEY: Final = "clip_norm"
#: The update metric of adaptive clipping: 1.0 if the site's change was within the round's clip.
CLIP_BELOW_METRIC: Final = "clip_below"


class AdaptiveClippingSpec(SpecModel):
    """Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping")."""

    target_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="The share of the sites' update norms the clip should settle above (gamma).",
    )
    learning_rate: float = Field(
        0.2, gt=0, le=10, description="eta of the geometric update C <- C exp(-eta (b - gamma))."
    )
    bit_noise_std: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description=(
            "Under dp: the standard deviation of the noise on the count of sites whose update was "
            "within the clip (sigma_b); the updates are then noised with sigma_delta = (sigma^-2 - "
            "(2 sigma_b)^-2)^-1/2 so that both together spend what noiseMultiplier says. Must exceed "
            "noiseMultiplier / 2. Default: the larger of noiseMultiplier and the sites a round selects "
            "/ 20 (Andrew et al.'s suggestion). Without dp the count is exact: leave it unset."
        ),
    )


class SecureAggregationSpec(SpecModel):
    """Secure aggregation (Bonawitz et al. 2017, SecAgg+ neighbourhoods): the aggregator learns the
    weighted sum of the round's updates and nothing about any one site's update or weight."""

    threshold: int | None = Field(
        None,
        ge=2,
        le=10_000,
        description=(
            "t: how many holders of a site's key shares must survive to unmask the sum; fewer "
            "survivors fail the round (reason SecAggTooFewSurvivors). Up to t - 1 sites colluding with "
            "the aggregator learn nothing of another site's update. Unset: a majority of a "
            "neighbourhood (the site and its neighbours), at least 2."
        ),
    )
    neighbours: int = Field(
        0,
        ge=0,
        le=10_000,
        description=(
            "SecAgg+: each site masks with and shares its keys among this many neighbours of a random "
            "graph drawn each round, so a site's work grows with log N rather than N. 0: every other "
            "site of the round (the complete graph of Bonawitz et al.)."
        ),
    )
    phase_timeout_seconds: int = Field(
        300,
        ge=10,
        le=86_400,
        description=(
            "How long the aggregator waits in each phase (key adverts, key shares, masked inputs) for a "
            "site still running before it goes on without it; a site that failed, or missed the round "
            "deadline, is never waited for."
        ),
    )
    max_samples: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description=(
            "The largest training-sample count a site's weight may carry (aggregation.weighting "
            "samples): a weight is the sample count in units of sampleUnit, capped at this count. With "
            "the number of sites and privacy.clipNorm it sets the fixed-point scale of the masked sums "
            "(32-bit): fedtrain validate refuses a combination that keeps under 8 bits of precision."
        ),
    )
    sample_unit: int = Field(
        1,
        ge=1,
        le=1_000_000,
        description=(
            "Samples per unit of weight under aggregation.weighting samples (a weight is the sample "
            "count divided by it, rounded up): raise it for sites with many samples, to keep precision."
        ),
    )


class PrivacySpec(SpecModel):
    """What protects a site's update beyond keeping its images at home."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.dp) || has(self.clipNorm)",
                "message": "dp: the noise is calibrated to the bound on each update: set privacy.clipNorm",
                "fieldPath": ".clipNorm",
            },
            {
                "rule": "!has(self.adaptiveClipping) || has(self.clipNorm)",
                "message": "adaptiveClipping: set privacy.clipNorm, the first round's clip",
                "fieldPath": ".clipNorm",
            },
            {
                "rule": "!has(self.adaptiveClipping) || !has(self.adaptiveClipping.bitNoiseStd)"
                " || (has(self.dp) && 2.0 * self.adaptiveClipping.bitNoiseStd > self.dp.noiseMultiplier)",
                "message": "adaptiveClipping.bitNoiseStd needs dp and must exceed dp.noiseMultiplier / 2",
                "fieldPath": ".adaptiveClipping.bitNoiseStd",
            },
        )
    )

    clip_norm: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description=(
            "Bound on the L2 norm of each update (all shared tensors together): the site scales its "
            "change down to it before it leaves, and the aggregator scales any update still above it "
            "(after rounding to the transfer dtype) down again before folding it in. Bounds what one "
            "site can do to the global model; required by dp."
        ),
    )
    dp: DpSpec | None = Field(
        None,
        description=(
            "Client-level differential privacy (DP-FedAvg): noise added by the aggregator, calibrated "
            "to clipNorm; an RDP accountant (Google's dp-accounting) composes the rounds the "
            "most-selected site took part in (the selection follows from training.seed, so no "
            "amplification by sampling is claimed), and the status shows epsilon at delta after each "
            "round. Protects against what the models reveal about any one site's data "
            "(everyone who receives a global model, including the sites); not against the aggregator, "
            "which sees each site's update, unless secureAggregation is on: each site then adds its "
            "share of the noise and the aggregator sees only the noised sum. Needs "
            "aggregation.weighting uniform, strategy fedavg or a "
            "server optimizer, exchange policy all, fixed or exclude, no controlVariates and no "
            "lora.aggregation product."
        ),
    )

    adaptive_clipping: AdaptiveClippingSpec | None = Field(
        None,
        description=(
            "Let the clip follow the updates: clipNorm is the first round's clip, and after each round "
            "the aggregator moves it toward the targetQuantile of the sites' update norms (each site "
            "reports whether its update was within the clip; under dp that count is noised). The clip "
            "a round used and the next one are in the round manifest and the next global model."
        ),
    )
    secure_aggregation: SecureAggregationSpec | None = Field(
        None,
        description=(
            "Secure aggregation: each site uploads its clipped update in 32-bit fixed point, weighted and "
            "masked (pairwise masks agreed by X25519 with its neighbours, and a self-mask), with its "
            "weight as one more masked element; the aggregator removes the masks only from the sum, so "
            "it learns the weighted mean and nothing about one site's update, weight or sample count. "
            "The keys, shares (AES-GCM under HKDF of X25519) and masked inputs travel through the "
            "object store: sites never connect to each other. A site that drops after sharing its keys "
            "is recovered while threshold holders survive. A site's Job waits through the phases "
            "(its secrets stay in its memory), so every selected site runs at once. What the aggregator "
            "can no longer check per update (norm, finite values) is enforced at the site and checked "
            "on the sum. Protects each update from the aggregator and the bucket's readers; not from a "
            "malicious aggregator lying about who survived. With dp each site adds its share of the noise "
            "(sigma clipNorm / sqrt(threshold)), so the aggregator sees only the noised sum. Needs "
            "privacy.clipNorm (fixed), aggregation.weighting samples or uniform, strategy fedavg or a "
            "server optimizer, exchange policy all, fixed or exclude, no controlVariates, no "
            "lora.aggregation product and no sites[].loraRank."
        ),
    )
    encrypt_at_rest: bool = Field(
        False,
        description=(
            "Seal every model, update and site state in the bucket with AES-256-GCM (the STREAM "
            "construction, a key per object derived by HKDF from the training's data key; see "
            "fedtrain/sealing.py) under a per-training data key that only the training's Jobs and its "
            "aggregator receive: on a cluster the operator generates it into the Secret "
            "<training>-data-key, in a local run it is the file data-key in the run directory. The "
            "bucket then holds ciphertext, and a tampered, truncated or swapped object is refused. "
            "Protects against a leaked bucket or its backups; not against anyone holding the key, "
            "and object names and sizes stay visible. Fixed at creation."
        ),
    )

    @model_validator(mode="after")
    def _dp_needs_a_clip(self) -> PrivacySpec:
        if self.dp is not None and self.clip_norm is None:
            raise ValueError(
                "dp: the noise is calibrated to the bound on each update: set privacy.clipNorm (e.g. a "
                "little above the median update norm of a run without it)"
            )
        adaptive = self.adaptive_clipping
        if adaptive is not None and self.clip_norm is None:
            raise ValueError("adaptiveClipping: set privacy.clipNorm, the first round's clip")
        if adaptive is not None and adaptive.bit_noise_std is not None:
            if self.dp is None:
                raise ValueError(
                    "adaptiveClipping.bitNoiseStd noises the count of sites within the clip, which only "
                    "dp needs: drop it, or set dp"
                )
            if 2 * adaptive.bit_noise_std <= self.dp.noise_multiplier:
                raise ValueError(
                    f"adaptiveClipping.bitNoiseStd must exceed dp.noiseMultiplier / 2 = "
                    f"{self.dp.noise_multiplier / 2:g}, or the count would spend the whole budget: raise it"
                )
        return self

    def round_clip(self, model_config: Mapping[str, Any]) -> float | None:
        """The clip of the round that starts from a global model with this metadata config: the one
        adaptive clipping wrote there (CLIP_CONFIG_KEY), else clipNorm."""
        written = model_config.get(CLIP_CONFIG_KEY)
        if self.adaptive_clipping is not None and isinstance(written, int | float) and written > 0:
            return float(written)
        return self.clip_norm

    def bit_noise_std(self, expected_sites: int) -> float:
        """sigma_b of the count of sites within the clip (0 without dp: the count is exact)."""
        if self.dp is None or self.adaptive_clipping is None:
            return 0.0
        given = self.adaptive_clipping.bit_noise_std
        return given if given is not None else max(self.dp.noise_multiplier, expected_sites / 20)


# --------------------------------------------------------------------------------------------------
# spec.storage


class RetentionSpec(SpecModel):
    """What the object store keeps of a training: by default everything."""

    delete_updates: bool = Field(
        False,
        description=(
            "Delete each training round's updates (and its secure-aggregation objects) once its "
            "manifest is written: the next global model holds what they were for."
        ),
    )
    keep_global_models: int | None = Field(
        None,
        ge=1,
        le=10000,
        description=(
            "Keep the last this many global models (and their fp32 copies); unset: keep all. The best "
            "round's model is kept whatever its age (the best merged model is made from it), and so "
            "is everything a running round or a resume reads. Manifests, the history and the sites' "
            "states are always kept."
        ),
    )

    @property
    def active(self) -> bool:
        return self.delete_updates or self.keep_global_models is not None


class StorageSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": f"!has(self.bucket) || (!self.bucket.matches('{IPV4}')"
                " && !self.bucket.startsWith('xn--') && !self.bucket.endsWith('-s3alias')"
                " && !self.bucket.endsWith('--ol-s3'))",
                "message": "bucket is not a name S3 accepts: not an IP address, no xn-- prefix, "
                "no -s3alias or --ol-s3 suffix",
                "fieldPath": ".bucket",
            },
        )
    )

    endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=SERVICE_URL,
        description=(
            "S3 endpoint URL (MinIO, Ceph RGW), http(s)://host[:port][/path]; omit for AWS S3. "
            "No credentials, query or fragment in it."
        ),
    )
    bucket: str | None = Field(
        None,
        min_length=3,
        max_length=63,
        pattern=BUCKET,
        description=(
            "Bucket: lowercase letters, digits, hyphens and single dots, as S3 names buckets. Required "
            "on a cluster; fedtrain run keeps its objects in the run directory (or --store) and reads "
            "only retention of this section."
        ),
    )
    prefix: str = Field(
        "fedtrain",
        max_length=256,
        pattern=f"^$|{RELATIVE_PATH}",
        description=(
            "Key prefix under which every training's objects live: empty (the bucket's root), or "
            "segments of letters, digits and -_+@=,~. joined by '/', no leading or trailing '/', no '.' "
            "or '..' segment."
        ),
    )
    region: str = Field(
        "us-east-1",
        min_length=1,
        max_length=63,
        pattern="^[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?$",
        description="S3 region.",
    )
    credentials_secret: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in the training's namespace.",
    )
    retention: RetentionSpec = Field(
        default_factory=RetentionSpec,
        description=(
            "What the store keeps once a round closes (fedtrain run applies it to the run directory's store)."
        ),
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_s3_accepts(cls, bucket: str | None) -> str | None:
        if bucket is None:
            return None
        reserved = bucket.startswith("xn--") or bucket.endswith(("-s3alias", "--ol-s3"))
        if reserved or re.fullmatch(IPV4, bucket):
            raise ValueError(
                "not a name S3 accepts: not an IP address, no xn-- prefix, no -s3alias or --ol-s3 suffix"
            )
        return bucket


# --------------------------------------------------------------------------------------------------
# spec.sites


class SyntheticData(SpecModel):
    samples: int = Field(600, ge=10, le=10_000_000, description="Wafer maps this site generates.")
    dirichlet_alpha: float = Field(
        0.5, gt=0, le=1e6, description="Class skew: smaller is more non-IID (Dirichlet concentration)."
    )
    map_size: int = Field(32, ge=16, le=512, description="Wafer map grid size in dies.")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Data seed; defaults to one derived from the site name."
    )
    contrast: float = Field(
        1.0,
        ge=0.1,
        le=10.0,
        description=(
            "Intensity shift of this site's images, as a different tool would give: each pixel "
            "x in [-1, 1] becomes contrast * x + brightness (1.0 and 0.0 change nothing)."
        ),
    )
    brightness: float = Field(
        0.0, ge=-2.0, le=2.0, description="Offset added to every pixel after contrast (see contrast)."
    )


class NpzData(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "has(self.path) != has(self.uri)",
                "message": "set exactly one of path (a file the trainer reads) or uri (a URL it downloads)",
            },
        )
    )

    path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=DATA_PATH,
        description=(
            "NPZ file with 'maps' (N,H,W die states) and 'labels', e.g. on the site's dataVolume; "
            "no '.' or '..' segment."
        ),
    )
    uri: str | None = Field(
        None,
        max_length=4096,
        pattern=DATA_URL,
        description="http(s):// or file:// URL the trainer downloads the NPZ file from (instead of path).",
    )

    @model_validator(mode="after")
    def _one_location(self) -> NpzData:
        if (self.path is None) == (self.uri is None):
            raise ValueError("set exactly one of path or uri")
        return self


class ImageFolderData(SpecModel):
    path: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        pattern=DATA_PATH,
        description="Directory with one sub-directory of images per class; no '.' or '..' segment.",
    )


class DataSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "(has(self.synthetic) ? 1 : 0) + (has(self.npz) ? 1 : 0)"
                " + (has(self.imageFolder) ? 1 : 0) == 1",
                "message": "set exactly one of synthetic, npz or imageFolder",
            },
        )
    )

    synthetic: SyntheticData | None = Field(None, description="Generated WM-811K-style wafer maps.")
    npz: NpzData | None = Field(None, description="Wafer maps in an NPZ file.")
    image_folder: ImageFolderData | None = Field(None, description="An ImageFolder directory tree.")

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSpec:
        chosen = [name for name in ("synthetic", "npz", "image_folder") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("set exactly one of synthetic, npz or imageFolder")
        return self


def _one_message(message: str) -> Callable[[Any, ValidatorFunctionWrapHandler], Any]:
    """A wrap validator that answers every failure of a union with one message (not one per branch)."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("value_error", message) from None

    return validate


#: A Kubernetes quantity: a non-negative integer, or a string such as 500m, 1.5 or 32Gi.
Quantity = Annotated[
    Annotated[int, Field(ge=0, le=INT64_MAX)] | Annotated[str, Field(max_length=64, pattern=QUANTITY)],
    WrapValidator(
        _one_message(
            "must be a Kubernetes quantity that is not negative: an integer, or a string such as "
            "500m, 1.5, 8Gi or 1e3"
        )
    ),
]
ResourceName = Annotated[str, Field(min_length=1, max_length=316, pattern=QUALIFIED_NAME)]


class Resources(SpecModel):
    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource requests, e.g. cpu: 500m, memory: 8Gi."
    )
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict, max_length=32, description="Resource limits, e.g. nvidia.com/gpu: 1."
    )


class TolerationOperator(ApiEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(ApiEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    """A Kubernetes toleration, e.g. for the nvidia.com/gpu taint of GPU nodes."""

    key: str | None = Field(
        None,
        max_length=316,
        pattern=f"^$|{QUALIFIED_NAME}",
        description="Taint key; empty with operator Exists matches every taint.",
    )
    operator: TolerationOperator = Field(TolerationOperator.EQUAL, description="Exists or Equal.")
    value: LabelValue | None = Field(None, description="Taint value (operator Equal).")
    effect: TaintEffect | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute.")
    toleration_seconds: int | None = Field(
        None, ge=0, le=INT64_MAX, description="How long a NoExecute taint is tolerated."
    )


#: Where the trainer's own volumes, or the kernel's, are mounted: a data volume goes elsewhere.
RESERVED_MOUNTS: Final = ("/tmp", "/dev", "/proc", "/sys", "/etc/fedtrain")


class DataVolume(SpecModel):
    """A PersistentVolumeClaim in the site's namespace, mounted into the trainer read-only."""

    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": f"!{list(RESERVED_MOUNTS)}.exists(r, self.mountPath == r"
                " || self.mountPath.startsWith(r + '/') || r.startsWith(self.mountPath + '/'))",
                "message": f"mountPath must not be, hold or lie inside {', '.join(RESERVED_MOUNTS)}: "
                "mount the data elsewhere, e.g. /data",
                "fieldPath": ".mountPath",
            },
        )
    )

    claim_name: str = Field(
        ..., min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="PersistentVolumeClaim name."
    )
    mount_path: str = Field(
        "/data",
        max_length=1024,
        pattern=ABSOLUTE_PATH,
        description=(
            "Where the trainer sees the volume (an absolute path, not / nor one of the trainer's own "
            "mounts); data paths point inside it."
        ),
    )
    sub_path: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        pattern=RELATIVE_PATH,
        description="Mount only this sub-directory of the volume (relative, no '.' or '..' segment).",
    )

    @field_validator("mount_path")
    @classmethod
    def _mount_path_free(cls, mount_path: str) -> str:
        path = mount_path.rstrip("/")
        for reserved in RESERVED_MOUNTS:
            if path == reserved or path.startswith(f"{reserved}/") or reserved.startswith(f"{path}/"):
                raise ValueError(
                    f"must not be, hold or lie inside {', '.join(RESERVED_MOUNTS)}: "
                    "mount the data elsewhere, e.g. /data"
                )
        return mount_path


#: The fields of a Kubernetes Affinity.
AFFINITY_KINDS: Final = ("nodeAffinity", "podAffinity", "podAntiAffinity")


class SiteSpec(SpecModel):
    # A transition rule on a list item is allowed because the CRD makes spec.sites a map list keyed by
    # name: the API server pairs each site with the old site of the same name.
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "(has(self.namespace) ? self.namespace : 'default')"
                " == (has(oldSelf.namespace) ? oldSelf.namespace : 'default')",
                "message": "a site's namespace cannot change after creation (its Jobs and secrets live "
                "there): create a new FederatedTraining",
                "fieldPath": ".namespace",
            },
        )
    )

    name: str = Field(..., min_length=1, max_length=40, pattern=DNS_LABEL, description="Site name.")
    namespace: str = Field(
        "default", min_length=1, max_length=63, pattern=DNS_LABEL, description="Site namespace."
    )
    data: DataSpec = Field(..., description="The site's private data.")
    data_volume: DataVolume | None = Field(
        None, description="PersistentVolumeClaim holding the site's data (read-only in the trainer)."
    )
    resources: Resources = Field(default_factory=Resources, description="Trainer container resources.")
    weight: float | None = Field(None, gt=0, le=1e9, description="Aggregation weight (weighting: explicit).")
    lora_rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "This site's own LoRA rank, at most lora.rank, for a site with less GPU memory or data "
            "(HetLoRA, Cho et al. 2024). Needs lora.aggregation product and an integer lora.rank: "
            "the site receives the global weight change truncated to its rank (the first components "
            "of the global factors, which the SVD orders by importance), trains adapters of that rank "
            "with scale alpha / loraRank, and the aggregator averages its weight change with the "
            "others'. The round manifest records the energy each site rank keeps "
            "(loraEnergyByRank). Unset: lora.rank."
        ),
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "CPU threads of the trainer's math libraries (OMP_NUM_THREADS). Default: on a cluster, the "
            "container's CPU limit (rounded up) where one is set; in a local run, the free cores shared "
            "among the trainers that run at once."
        ),
    )
    node_selector: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the trainer pod must run on, e.g. a GPU type.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Taints the trainer pod tolerates (GPU nodes are often tainted).",
    )
    affinity: dict[str, Any] | None = Field(
        None,
        max_length=len(AFFINITY_KINDS),
        json_schema_extra=_cel_rules(
            {
                # Counting the known fields, not iterating the keys: the API server would estimate a
                # key as long as a request, and a rule over keys would exceed the cost budget.
                "rule": "size(self) == "
                + " + ".join(f"(has(self.{kind}) ? 1 : 0)" for kind in AFFINITY_KINDS),
                "message": f"affinity takes {', '.join(AFFINITY_KINDS)}: check the field's spelling",
            },
        ),
        description=(
            "A Kubernetes Affinity object for the trainer pod (nodeAffinity, podAffinity, "
            "podAntiAffinity), passed through as written; the operator checks it against the "
            f"Kubernetes schema. At most {MAX_OBJECT_BYTES // 1024} KiB as JSON."
        ),
    )
    priority_class_name: Name | None = Field(None, description="PriorityClass of the trainer pod.")
    scheduler_name: Name | None = Field(None, description="Scheduler for the trainer pod.")
    service_account_name: Name | None = Field(
        None, description="ServiceAccount the trainer runs as (its token is not mounted)."
    )
    image_pull_secrets: list[Name] = Field(
        default_factory=list,
        max_length=16,
        description="Secrets in the site's namespace for pulling the trainer image.",
    )

    @field_validator("affinity")
    @classmethod
    def _affinity_bounded(cls, affinity: dict[str, Any] | None) -> dict[str, Any] | None:
        if affinity is None:
            return None
        unknown = sorted(set(affinity) - set(AFFINITY_KINDS))
        if unknown:
            raise ValueError(
                f"unknown field {', '.join(unknown)}: an affinity takes {', '.join(AFFINITY_KINDS)}"
            )
        if len(json.dumps(affinity)) > MAX_OBJECT_BYTES:
            raise ValueError(f"larger than {MAX_OBJECT_BYTES // 1024} KiB as JSON")
        return affinity


# --------------------------------------------------------------------------------------------------
# the spec


class FederatedTrainingSpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "!has(self.aggregation) || !has(self.aggregation.minSites)"
                " || self.aggregation.minSites <= size(self.sites)",
                "message": "aggregation.minSites is larger than the number of sites: "
                "lower minSites or add sites",
                "messageExpression": "'aggregation.minSites is ' + string(self.aggregation.minSites)"
                " + ' but there are only ' + string(size(self.sites))"
                " + ' sites: lower minSites or add sites'",
                "fieldPath": ".aggregation.minSites",
            },
            {
                "rule": "!has(self.aggregation) || !has(self.aggregation.weighting)"
                " || self.aggregation.weighting != 'explicit' || self.sites.all(s, has(s.weight))",
                "message": "aggregation.weighting is explicit but a site has no weight: "
                "set weight on every site",
                "fieldPath": ".sites",
                "reason": "FieldValueRequired",
            },
            {
                "rule": "!self.sites.exists(s, has(s.data.synthetic) || has(s.data.npz))"
                f" || (has(self.model.labels) ? size(self.model.labels) == {len(WAFER_CLASSES)}"
                f" : has(self.model.numClasses) && self.model.numClasses == {len(WAFER_CLASSES)})",
                "message": f"synthetic and npz wafer data have {len(WAFER_CLASSES)} classes but the "
                "model has another number: set model.labels to the WM-811K classes or "
                f"numClasses: {len(WAFER_CLASSES)}",
                "fieldPath": ".model",
            },
            {
                "rule": "self.model == oldSelf.model",
                "message": "model cannot change after creation: create a new FederatedTraining",
                "fieldPath": ".model",
            },
            {
                "rule": "has(self.lora) == has(oldSelf.lora)"
                " && (!has(self.lora) || self.lora == oldSelf.lora)",
                "message": "lora cannot change after creation (the updates of every round depend on it): "
                "create a new FederatedTraining",
                "fieldPath": ".lora",
            },
            {
                "rule": "has(self.exchange) == has(oldSelf.exchange)"
                " && (!has(self.exchange) || self.exchange == oldSelf.exchange)",
                "message": "exchange cannot change after creation (what each site keeps and sends "
                "shapes every round): create a new FederatedTraining",
                "fieldPath": ".exchange",
            },
            {
                "rule": "(has(self.aggregation) && has(self.aggregation.controlVariates)"
                " ? self.aggregation.controlVariates : 'none')"
                " == (has(oldSelf.aggregation) && has(oldSelf.aggregation.controlVariates)"
                " ? oldSelf.aggregation.controlVariates : 'none')",
                "message": "aggregation.controlVariates cannot change after creation (the sites' and "
                "the server's control variates start with the training): create a new FederatedTraining",
                "fieldPath": ".aggregation.controlVariates",
            },
            {
                "rule": "(has(self.mode) ? self.mode : 'federated')"
                " == (has(oldSelf.mode) ? oldSelf.mode : 'federated')",
                "message": "mode cannot change after creation: create a new FederatedTraining",
                "fieldPath": ".mode",
            },
            {
                "rule": "!has(self.mode) || self.mode != 'localOnly' || !has(self.exchange)"
                " || !has(self.exchange.policy) || self.exchange.policy == 'all'",
                "message": "mode localOnly keeps every trainable tensor at its site, so exchange "
                "cannot choose what is shared: drop the exchange block or use mode federated",
                "fieldPath": ".exchange",
            },
            {
                "rule": "!has(self.lora) || !has(self.lora.aggregation) || self.lora.aggregation != 'product'"
                " || ((!has(self.aggregation) || !has(self.aggregation.strategy)"
                " || self.aggregation.strategy == 'fedavg')"
                " && (!has(self.exchange) || !has(self.exchange.policy)"
                " || self.exchange.policy in ['all', 'fixed', 'exclude'])"
                " && (!has(self.mode) || self.mode != 'localOnly'))",
                "message": "lora.aggregation: product needs aggregation.strategy fedavg, an exchange "
                "policy that sends whole factors (all, fixed or exclude) and mode federated",
                "fieldPath": ".lora.aggregation",
            },
            {
                "rule": "!self.sites.exists(s, has(s.loraRank))"
                " || (has(self.lora) && has(self.lora.aggregation) && self.lora.aggregation == 'product'"
                " && has(self.lora.rank) && type(self.lora.rank) == int"
                " && self.sites.all(s, !has(s.loraRank) || s.loraRank <= self.lora.rank)"
                " && (!has(self.aggregation) || !has(self.aggregation.controlVariates)"
                " || self.aggregation.controlVariates != 'scaffold'))",
                "message": "sites[].loraRank needs lora.aggregation product, an integer lora.rank at least "
                "every site's loraRank, and no aggregation.controlVariates",
                "fieldPath": ".sites",
            },
            {
                "rule": "!has(self.privacy) || !has(self.privacy.clipNorm) || !has(self.aggregation)"
                " || !has(self.aggregation.strategy)"
                " || self.aggregation.strategy in ['fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad']",
                "message": "privacy.clipNorm works with aggregation.strategy fedavg or a server optimizer "
                "(a robust strategy bounds outliers its own way)",
                "fieldPath": ".privacy.clipNorm",
            },
            {
                "rule": "!has(self.privacy) || !has(self.privacy.dp)"
                " || (has(self.aggregation) && has(self.aggregation.weighting)"
                " && self.aggregation.weighting == 'uniform'"
                " && (!has(self.aggregation.controlVariates)"
                " || self.aggregation.controlVariates != 'scaffold')"
                " && (!has(self.exchange) || !has(self.exchange.policy)"
                " || self.exchange.policy in ['all', 'fixed', 'exclude'])"
                " && (!has(self.lora) || !has(self.lora.aggregation) || self.lora.aggregation != 'product')"
                " && (!has(self.mode) || self.mode != 'localOnly'))",
                "message": "privacy.dp needs aggregation.weighting uniform, exchange policy all, fixed or "
                "exclude, no aggregation.controlVariates, no lora.aggregation product and mode federated",
                "fieldPath": ".privacy.dp",
            },
            {
                "rule": "!has(self.aggregation) || !has(self.aggregation.controlVariates)"
                " || self.aggregation.controlVariates != 'scaffold'"
                " || ((!has(self.mode) || self.mode != 'localOnly')"
                " && (!has(self.exchange) || !has(self.exchange.policy)"
                " || self.exchange.policy in ['all', 'fixed', 'exclude'])"
                " && (!has(self.training) || !has(self.training.transferDtype)"
                " || self.training.transferDtype != 'int8'))",
                "message": "aggregation.controlVariates: scaffold needs every shared tensor's change each "
                "round in fp32, bf16 or fp16: not with mode localOnly, exchange policy dynamic or sparse, "
                "or training.transferDtype int8",
                "fieldPath": ".aggregation.controlVariates",
            },
            {
                "rule": "!has(self.exchange) || !has(self.exchange.policy)"
                " || self.exchange.policy != 'sparse' || !has(self.training)"
                " || !has(self.training.transferDtype)"
                " || self.training.transferDtype != 'int8'",
                "message": "exchange policy sparse sends each tensor's largest elements with their "
                "indices and training.transferDtype int8 quantises whole tensors: choose one (sparse "
                "values go in fp32, bf16 or fp16)",
                "fieldPath": ".training.transferDtype",
            },
            {
                "rule": "has(self.storage) == has(oldSelf.storage)"
                " && (!has(self.storage) || self.storage == oldSelf.storage)",
                "message": "storage cannot change after creation (the models and updates are there): "
                "create a new FederatedTraining",
                "fieldPath": ".storage",
            },
            {
                "rule": "(has(self.privacy) && has(self.privacy.encryptAtRest) && self.privacy.encryptAtRest)"
                " == (has(oldSelf.privacy) && has(oldSelf.privacy.encryptAtRest)"
                " && oldSelf.privacy.encryptAtRest)",
                "message": "privacy.encryptAtRest cannot change after creation (the objects in the bucket "
                "are sealed or not): create a new FederatedTraining",
                "fieldPath": ".privacy",
            },
            {
                "rule": "self.sites.map(s, s.name) == oldSelf.sites.map(s, s.name)",
                "message": "sites cannot be added, removed, renamed or reordered after creation: "
                "create a new FederatedTraining",
                "fieldPath": ".sites",
            },
        )
    )

    model: ModelSpec = Field(..., description="The model every site fine-tunes.")
    mode: TrainingMode = Field(
        TrainingMode.FEDERATED,
        description=(
            "federated: sites exchange updates each round. localOnly: the baseline a consortium "
            "compares against: every site fine-tunes on its own data for the same rounds and steps, "
            "no tensor leaves a site (updates carry metrics only), each round scores each site's own "
            "model on its own validation split, and in the final evaluation each site writes its own "
            "merged model to the bucket (status.siteModelUris). Takes no exchange block."
        ),
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Low-rank adaptation settings.")
    exchange: ExchangeSpec = Field(
        default_factory=ExchangeSpec,
        description=(
            "Which trainable tensors leave each site; the rest stay personal to the site. With "
            "siteModels: true each site's merged model, personal layers included, is published to the "
            "bucket at the end (opt-in: by default personal layers never leave a site)."
        ),
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Local training settings.")
    aggregation: AggregationSpec = Field(
        default_factory=AggregationSpec, description="How updates are combined and rounds close."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Validation metric and early stopping."
    )
    privacy: PrivacySpec = Field(
        default_factory=PrivacySpec,
        description="Clipping and differential privacy of the sites' updates (none by default).",
    )
    storage: StorageSpec | None = Field(
        None,
        description=(
            "S3-compatible object storage for models and updates (its bucket is required on a cluster), "
            "and what it keeps (retention)."
        ),
    )
    sites: list[SiteSpec] = Field(
        ..., min_length=1, max_length=256, description="Participating sites, unique by name."
    )
    suspend: bool = Field(False, description="Stop running Jobs and hold the training until false.")

    @model_validator(mode="after")
    def _consistent(self) -> FederatedTrainingSpec:
        names = [site.name for site in self.sites]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"site names must be unique: {', '.join(duplicates)} repeated")
        if self.aggregation.min_sites > len(self.sites):
            raise ValueError(
                f"aggregation.minSites is {self.aggregation.min_sites} but there are only "
                f"{len(self.sites)} sites: lower minSites or add sites"
            )
        if self.aggregation.weighting is Weighting.EXPLICIT:
            missing = [site.name for site in self.sites if site.weight is None]
            if missing:
                raise ValueError(f"weighting is explicit but sites {', '.join(missing)} have no weight")
        if self.mode is TrainingMode.LOCAL_ONLY and self.exchange.policy is not ExchangePolicy.ALL:
            raise ValueError(
                "exchange: mode localOnly keeps every trainable tensor at its site, so exchange cannot "
                f"choose what is shared (policy {self.exchange.policy.value}): drop the exchange block "
                "or use mode federated"
            )
        self._check_scaffold()
        self._check_cross_site()
        self._check_swag()
        self._check_lora_product()
        self._check_site_ranks()
        self._check_privacy()
        sparse = self.exchange.policy is ExchangePolicy.SPARSE
        if sparse and self.training.transfer_dtype is TransferDtype.INT8:
            raise ValueError(
                "training.transferDtype: exchange policy sparse sends each tensor's largest elements "
                "with their indices and int8 quantises whole tensors: choose one (sparse values go in "
                "fp32, bf16 or fp16)"
            )
        uses_wafer_data = any(site.data.synthetic or site.data.npz for site in self.sites)
        if uses_wafer_data and self.model.class_count != len(WAFER_CLASSES):
            raise ValueError(
                f"synthetic and npz wafer data have {len(WAFER_CLASSES)} classes but the model has "
                f"{self.model.class_count}: set model.labels to the WM-811K classes or numClasses: 9"
            )
        return self

    def _check_lora_product(self) -> None:
        if self.lora.aggregation is not LoraAggregation.PRODUCT:
            return
        if self.aggregation.strategy is not StrategyName.FEDAVG:
            raise ValueError(
                "lora.aggregation: product replaces the LoRA factors by the factorised mean change, which "
                f"strategy {self.aggregation.strategy.value} would step or combine otherwise: use "
                "aggregation.strategy fedavg"
            )
        if self.exchange.policy in (ExchangePolicy.DYNAMIC, ExchangePolicy.SPARSE):
            raise ValueError(
                "lora.aggregation: product needs both factors of every adapted layer each round, and "
                f"exchange policy {self.exchange.policy.value} sends a part: choose all, fixed or exclude"
            )
        if self.mode is TrainingMode.LOCAL_ONLY:
            raise ValueError("lora.aggregation: product combines sites' factors: drop it with mode localOnly")

    def _check_privacy(self) -> None:
        privacy = self.privacy
        if privacy.clip_norm is not None and self.aggregation.strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"privacy.clipNorm works with aggregation.strategy fedavg or a server optimizer, not "
                f"{self.aggregation.strategy.value} (a robust strategy bounds outliers its own way)"
            )
        self._check_secure_aggregation()
        if privacy.dp is None:
            return
        problems = {
            "aggregation.weighting uniform (a site's weight must not depend on what it claims)": (
                self.aggregation.weighting is not Weighting.UNIFORM
            ),
            "no aggregation.controlVariates (SCAFFOLD's control changes are not clipped or noised)": (
                self.aggregation.scaffold
            ),
            "exchange policy all, fixed or exclude (which tensors or elements a site sends would "
            "itself be unprotected)": self.exchange.policy in (ExchangePolicy.DYNAMIC, ExchangePolicy.SPARSE),
            "no lora.aggregation product (it averages the sites' factors, not their noised changes)": (
                self.lora.aggregation is LoraAggregation.PRODUCT
            ),
            "mode federated": self.mode is TrainingMode.LOCAL_ONLY,
        }
        if broken := [need for need, failed in problems.items() if failed]:
            raise ValueError(f"privacy.dp needs {'; '.join(broken)}")

    def _check_secure_aggregation(self) -> None:
        privacy, secure = self.privacy, self.privacy.secure_aggregation
        if secure is None:
            return
        problems = {
            "privacy.clipNorm (it bounds each update, and so the fixed-point range of the sums)": (
                privacy.clip_norm is None
            ),
            "no privacy.adaptiveClipping (the sites' clip bits would be seen one by one)": (
                privacy.adaptive_clipping is not None
            ),
            "aggregation.weighting samples or uniform (uniform under privacy.dp)": (
                self.aggregation.weighting is Weighting.EXPLICIT
            ),
            "aggregation.strategy fedavg or a server optimizer (a robust strategy needs each update)": (
                self.aggregation.strategy in ROBUST_STRATEGIES
            ),
            "no aggregation.controlVariates": self.aggregation.scaffold,
            "exchange policy all, fixed or exclude (every site sends the same tensors)": (
                self.exchange.policy in (ExchangePolicy.DYNAMIC, ExchangePolicy.SPARSE)
            ),
            "no lora.aggregation product": self.lora.aggregation is LoraAggregation.PRODUCT,
            "no sites[].loraRank (every site sends tensors of one shape)": any(
                site.lora_rank is not None for site in self.sites
            ),
            "mode federated": self.mode is TrainingMode.LOCAL_ONLY,
        }
        if broken := [need for need, failed in problems.items() if failed]:
            raise ValueError(f"privacy.secureAggregation needs {'; '.join(broken)}")
        selected = self.aggregation.sites_per_round(len(self.sites))
        if secure.threshold is not None and secure.threshold > selected:
            raise ValueError(
                f"privacy.secureAggregation.threshold {secure.threshold} exceeds the {selected} sites a "
                "round selects: no round could ever be unmasked; lower it"
            )
        if secure.threshold is not None and 0 < secure.neighbours < secure.threshold - 1:
            raise ValueError(
                f"privacy.secureAggregation.threshold {secure.threshold} exceeds a site and its "
                f"{secure.neighbours} neighbours: raise neighbours to at least {secure.threshold - 1} "
                "or lower the threshold"
            )
        from fedtrain.secagg_round import fixed_point  # numpy, only where secure aggregation is asked for

        assert privacy.clip_norm is not None
        try:
            fixed_point(secure, privacy.clip_norm, len(self.sites), self.aggregation.weighting)
        except ValueError as error:
            raise ValueError(f"privacy.secureAggregation: {error}") from None

    def _check_cross_site(self) -> None:
        if not self.evaluation.cross_site:
            return
        needs = {
            "evaluation.testFraction above 0 (the matrix is scored on the test splits)": (
                self.evaluation.test_fraction > 0
            ),
            "mode federated": self.mode is TrainingMode.FEDERATED,
            "exchange policy all (a site's local model is what the aggregator rebuilds from its update)": (
                self.exchange.policy is ExchangePolicy.ALL
            ),
            f"at most {MAX_CROSS_SITE_SITES} sites": len(self.sites) <= MAX_CROSS_SITE_SITES,
            "no privacy.secureAggregation (it hides each site's update)": (
                self.privacy.secure_aggregation is None
            ),
            "no storage.retention.deleteUpdates (the last round's updates make the local models)": (
                not self.retention.delete_updates
            ),
            "no sites[].loraRank": all(site.lora_rank is None for site in self.sites),
        }
        missing = [need for need, met in needs.items() if not met]
        if missing:
            needed = "; ".join(missing)
            raise ValueError(f"evaluation.crossSite needs {needed}: change these or drop crossSite")

    def _check_swag(self) -> None:
        uncertainty = self.evaluation.uncertainty
        if uncertainty.method is not UncertaintyMethod.SWAG:
            return
        needs = {
            f"swagRounds ({uncertainty.swag_rounds}) at most training.rounds ({self.training.rounds})": (
                uncertainty.swag_rounds <= self.training.rounds
            ),
            "mode federated": self.mode is TrainingMode.FEDERATED,
            "no evaluation.patience (the SWAG rounds are the last ones, unknown when a training may "
            "stop early)": self.evaluation.patience is None,
            "exchange policy all, fixed or exclude (every site samples the same tensors)": (
                self.exchange.policy not in (ExchangePolicy.DYNAMIC, ExchangePolicy.SPARSE)
            ),
            "no privacy.secureAggregation or privacy.dp (the moments would leave a site unprotected)": (
                self.privacy.secure_aggregation is None and self.privacy.dp is None
            ),
            "aggregation.strategy fedavg or a server optimizer (a robust strategy's protection would "
            "not cover the moments)": self.aggregation.strategy not in ROBUST_STRATEGIES,
            "no lora.aggregation product (the global factors change basis every round)": (
                self.lora.aggregation is not LoraAggregation.PRODUCT
            ),
        }
        if missing := [need for need, met in needs.items() if not met]:
            raise ValueError(
                f"evaluation.uncertainty swag needs {'; '.join(missing)}: change these or use mcDropout"
            )

    def _check_site_ranks(self) -> None:
        ranked = [site for site in self.sites if site.lora_rank is not None]
        if not ranked:
            return
        where = f"sites[{self.sites.index(ranked[0])}].loraRank"
        if self.lora.aggregation is not LoraAggregation.PRODUCT:
            raise ValueError(
                f"{where}: a site's own LoRA rank needs lora.aggregation product (the average of the "
                "sites' weight changes, which factors of different ranks can still form): set it, or "
                "drop loraRank"
            )
        if not isinstance(self.lora.rank, int):
            raise ValueError(
                f"{where}: a site's own LoRA rank needs an integer lora.rank to be at most, not "
                f"{self.lora.rank}"
            )
        if above := [site for site in ranked if (site.lora_rank or 0) > self.lora.rank]:
            raise ValueError(
                f"sites[{self.sites.index(above[0])}].loraRank {above[0].lora_rank} is above lora.rank "
                f"{self.lora.rank}: a site receives the global factors truncated to its rank, so lower "
                "it or raise lora.rank"
            )
        if self.aggregation.control_variates is ControlVariates.SCAFFOLD:
            raise ValueError(
                f"{where}: SCAFFOLD's control variates have the global model's shapes, which a site of "
                "another rank does not train: drop aggregation.controlVariates or loraRank"
            )

    def _check_scaffold(self) -> None:
        if self.aggregation.control_variates is not ControlVariates.SCAFFOLD:
            return
        if self.mode is TrainingMode.LOCAL_ONLY:
            raise ValueError(
                "aggregation.controlVariates: scaffold corrects federated training: drop it with mode "
                "localOnly"
            )
        if self.exchange.policy in (ExchangePolicy.DYNAMIC, ExchangePolicy.SPARSE):
            raise ValueError(
                "aggregation.controlVariates: scaffold needs every shared tensor's change each round, and "
                f"exchange policy {self.exchange.policy.value} sends a part: choose policy all, fixed or "
                "exclude"
            )
        if self.training.transfer_dtype is TransferDtype.INT8:
            raise ValueError(
                "aggregation.controlVariates: scaffold sends control changes beside the update in fp32, "
                "bf16 or fp16, not int8: choose another training.transferDtype"
            )

    def site(self, name: str) -> SiteSpec:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    @property
    def keeps_personal(self) -> bool:
        return keeps_personal(self.mode, self.exchange)

    @property
    def publishes_site_models(self) -> bool:
        return publishes_site_models(self.mode, self.exchange)

    @property
    def object_storage(self) -> StorageSpec | None:
        """spec.storage where it names a bucket: the S3 store a cluster keeps the training in."""
        return self.storage if self.storage is not None and self.storage.bucket is not None else None

    @property
    def retention(self) -> RetentionSpec:
        """storage.retention, or keep everything where the spec has no storage section."""
        return self.storage.retention if self.storage is not None else RetentionSpec()


# --------------------------------------------------------------------------------------------------
# status


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class Stage(StrEnum):
    """Where the current round is: sites training, or the round being closed by the aggregator."""

    INITIALIZING = "Initializing"
    TRAINING = "Training"
    CLOSING = "Closing"
    EVALUATING = "Evaluating"
    FINALIZING = "Finalizing"
    DONE = "Done"


class SiteState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    TRAINED = "Trained"
    ACCEPTED = "Accepted"
    REJECTED = "Rejected"
    FAILED = "Failed"
    STRAGGLER = "Straggler"

    @property
    def terminal(self) -> bool:
        return self in (SiteState.ACCEPTED, SiteState.REJECTED, SiteState.FAILED, SiteState.STRAGGLER)


class ConditionType(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    INVALID = "Invalid"
    WAITING = "Waiting"
    PRIVACY_BUDGET = "PrivacyBudget"


class Condition(ApiModel):
    type: ConditionType = Field(..., description="Condition type.")
    status: Literal["True", "False", "Unknown"] = Field(..., description="True, False or Unknown.")
    reason: str = Field(..., description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: datetime = Field(..., description="When status last changed.")


#: Sites report per-class counts for models of at most this many classes: the current round's counts
#: of up to 256 sites live in the status, which must stay far below etcd's object limit.
MAX_COUNTED_CLASSES: Final = 100
#: Equal-width confidence bins of the expected calibration error.
CALIBRATION_BINS: Final = 15


class ClassCounts(ApiModel):
    """Per class, in label order: the counts that macro-F1 and per-class accuracy are made of. Summed
    over sites they give the pooled predictions' figures exactly (no image, no prediction travels)."""

    support: list[int] = Field(..., max_length=MAX_COUNTED_CLASSES, description="Samples of the class.")
    predicted: list[int] = Field(
        ..., max_length=MAX_COUNTED_CLASSES, description="Samples predicted as the class."
    )
    correct: list[int] = Field(
        ..., max_length=MAX_COUNTED_CLASSES, description="Samples of the class predicted as it."
    )


class CalibrationBins(ApiModel):
    """The top-class confidences in equal-width bins over [0, 1]: what the expected calibration error
    is made of, summable over sites."""

    count: list[int] = Field(..., max_length=CALIBRATION_BINS, description="Predictions in each bin.")
    confidence: list[float] = Field(
        ..., max_length=CALIBRATION_BINS, description="Sum of their top-class probabilities."
    )
    correct: list[int] = Field(..., max_length=CALIBRATION_BINS, description="How many were right.")


class EvalMetrics(ApiModel):
    """How a global model scored on one site's validation or test split, or on all sites' pooled."""

    loss: float = Field(..., description="Mean cross-entropy (the negative log-likelihood).")
    accuracy: float = Field(..., description="Top-1 accuracy.")
    macro_f1: float = Field(..., description="Macro-averaged F1 over the classes present.")
    samples: int = Field(..., description="Samples scored.")
    ece: float | None = Field(
        None, description=f"Expected calibration error over {CALIBRATION_BINS} equal-width confidence bins."
    )
    class_counts: ClassCounts | None = Field(
        None,
        description=(
            f"Per-class counts (models of at most {MAX_COUNTED_CLASSES} classes): the pooled figures "
            "of all sites are computed from their sum. Kept for the current round and the pooled "
            "figures of each closed round."
        ),
    )
    calibration: CalibrationBins | None = Field(None, description="What the ECE is computed from.")
    uncertain_error_rate: float | None = Field(
        None,
        description=(
            "The final evaluation's test figures: the error rate among the 10 % of predictions with "
            "the highest predictive entropy (pooled: the sites' rates weighted by samples)."
        ),
    )
    error_auroc: float | None = Field(
        None,
        description=(
            "The final evaluation's test figures: how well predictive entropy tells errors from right "
            "predictions (AUROC; 0.5 is chance; pooled: the sites' weighted by samples)."
        ),
    )
    pooled: bool | None = Field(
        None,
        description=(
            "All sites' figures: true where macro-F1 and ECE are those of the pooled predictions "
            "(from the summed counts), false where a site sent no counts and they are sample-weighted "
            "means of the sites' own."
        ),
    )

    def compact(self) -> EvalMetrics:
        """The figures without the counts they came from (what a round's history keeps per site)."""
        return self.model_copy(update={"class_counts": None, "calibration": None})

    def value(self, metric: MetricName) -> float:
        return {"accuracy": self.accuracy, "macroF1": self.macro_f1, "loss": self.loss}[metric.value]


class SiteRoundStatus(ApiModel):
    name: str = Field(..., description="Site name.")
    state: SiteState = Field(SiteState.PENDING, description="Where the site is in this round.")
    attempt: int = Field(0, ge=0, description="Trainer attempt, from 0.")
    message: str | None = Field(None, description="Why the site failed or was rejected.")
    started_at: datetime | None = Field(None, description="When the current attempt was started.")
    finished_at: datetime | None = Field(None, description="When the site reached a final state.")
    samples: int | None = Field(None, description="Training samples reported with the update.")
    evaluation: EvalMetrics | None = Field(None, description="This round's global model on the site.")
    test_evaluation: EvalMetrics | None = Field(
        None, description="The final evaluation: the final model on the site's test split."
    )
    cross_site: dict[str, EvalMetrics] = Field(
        default_factory=dict,
        max_length=MAX_CROSS_SITE_SITES,
        description="evaluation.crossSite: each site's last local model on this site's test split.",
    )
    test_uncertainty: EvalMetrics | None = Field(
        None, description="evaluation.uncertainty: the final model's test figures under the method."
    )
    update_bytes: int | None = Field(
        None, description="Size of the uploaded update (with, in SWAG rounds, the site's SWAG moments)."
    )
    train_seconds: float | None = Field(None, description="Local training time.")


class RejectedUpdate(ApiModel):
    site: str = Field(..., description="Site name.")
    reason: str = Field(..., description="Why the aggregator rejected the update.")


class RoundRecord(ApiModel):
    round: int = Field(..., description="Round index, from 0.")
    kind: Literal["train", "evaluate"] = Field("train", description="train, or the final evaluation.")
    started_at: datetime = Field(..., description="When the round started.")
    closed_at: datetime = Field(..., description="When the round closed.")
    participants: list[str] = Field(default_factory=list, description="Sites whose update was used.")
    stragglers: list[str] = Field(default_factory=list, description="Sites past the deadline.")
    failed: list[str] = Field(default_factory=list, description="Sites whose trainer failed.")
    rejected: list[RejectedUpdate] = Field(default_factory=list, description="Rejected updates.")
    evaluation: EvalMetrics | None = Field(
        None,
        description=(
            "The round's global model on all sites' validation splits, pooled: loss and accuracy weighted "
            "by samples, macro-F1 and ECE from the sum of the sites' counts (pooled: true)."
        ),
    )
    site_evaluation: dict[str, EvalMetrics] = Field(
        default_factory=dict, description="The round's global model on each site."
    )
    test_evaluation: EvalMetrics | None = Field(
        None,
        description=(
            "The final evaluation with evaluation.testFraction: the final model on all sites' test "
            "splits, pooled."
        ),
    )
    site_test_evaluation: dict[str, EvalMetrics] = Field(
        default_factory=dict, description="The final evaluation: the final model on each site's test split."
    )
    test_uncertainty: EvalMetrics | None = Field(
        None,
        description=(
            "evaluation.uncertainty: the final model's figures under the method (mcDropout: the mean of "
            "its passes' probabilities) on all sites' test splits, pooled."
        ),
    )
    site_test_uncertainty: dict[str, EvalMetrics] = Field(
        default_factory=dict, description="evaluation.uncertainty: the same on each site's test split."
    )
    cross_site: dict[str, dict[str, EvalMetrics]] = Field(
        default_factory=dict,
        max_length=MAX_CROSS_SITE_SITES,
        description=(
            "evaluation.crossSite: for each site's last local model, its figures on each site's test "
            "split (model -> scoring site); with siteTestEvaluation, the global model's column, the "
            "N x (N + 1) matrix."
        ),
    )
    bytes_uploaded: int = Field(
        0, description="Update bytes the sites uploaded (with SWAG's moments in its rounds)."
    )
    site_bytes: dict[str, int] = Field(
        default_factory=dict, description="Update bytes each site uploaded (sites that uploaded one)."
    )
    model_uri: str | None = Field(None, description="Global model this round produced.")
    left_out: list[str] = Field(
        default_factory=list,
        description="Participants whose accepted update the robust strategy left out (krum, multiKrum).",
    )
    trimmed_share: dict[str, float] = Field(
        default_factory=dict,
        description="trimmedMean: the share of each participant's values that were trimmed away.",
    )
    epsilon: float | None = Field(
        None,
        description="privacy.dp: epsilon at delta spent by the training rounds up to this one.",
    )
    secure_dropouts: list[str] = Field(
        default_factory=list,
        description=(
            "privacy.secureAggregation: sites that shared their keys but did not finish the round "
            "(failed or late, after masking or before); the round was unmasked without them."
        ),
    )

    @property
    def duration_seconds(self) -> float:
        return (self.closed_at - self.started_at).total_seconds()


class AttemptRef(ApiModel):
    """One attempt of one round of a site."""

    round: int = Field(..., ge=0, description="Round index, from 0.")
    attempt: int = Field(..., ge=0, description="Trainer attempt, from 0.")


class FederatedTrainingStatus(ApiModel):
    phase: Phase = Field(Phase.PENDING, description="Pending, Running, Suspended, Succeeded or Failed.")
    stage: Stage = Field(Stage.INITIALIZING, description="Where the current round is.")
    round: int = Field(0, ge=0, description="Current round, from 0.")
    round_started_at: datetime | None = Field(None, description="When the current round started.")
    round_deadline: datetime | None = Field(None, description="When unfinished sites become stragglers.")
    sites: list[SiteRoundStatus] = Field(
        default_factory=list, max_length=256, description="Sites of the current round."
    )
    history: list[RoundRecord] = Field(
        default_factory=list,
        max_length=STATUS_HISTORY_LIMIT,
        description=f"The last {STATUS_HISTORY_LIMIT} closed rounds.",
    )
    global_model_uri: str | None = Field(None, description="The current global model.")
    best_model_uri: str | None = Field(None, description="The global model that scored best.")
    best_round: int | None = Field(None, description="Round whose global model scored best.")
    best_metric: float | None = Field(None, description="Its value of evaluation.metric.")
    rounds_without_improvement: int = Field(0, ge=0, description="Rounds since the best one.")
    final_model_uri: str | None = Field(None, description="Merged final model (LoRA folded in).")
    best_merged_model_uri: str | None = Field(
        None,
        description=(
            "The best round's global model merged like the final one (LoRA folded in, loadable by "
            "timm): the model that scored best on the sites' validation splits."
        ),
    )
    swag_model_uri: str | None = Field(
        None,
        description=(
            "evaluation.uncertainty swag: the SWAG model, plain timm weights at the SWAG mean with the "
            "moments as swag.* tensors beside them (fedtrain predict samples from it)."
        ),
    )
    test_evaluation: EvalMetrics | None = Field(
        None,
        description=(
            "evaluation.testFraction: the final model on all sites' held-out test splits, pooled (never "
            "used to pick the best round)."
        ),
    )
    test_uncertainty: EvalMetrics | None = Field(
        None,
        description=(
            "evaluation.uncertainty: the final model under the method on the held-out test splits, pooled "
            "(NLL, ECE, error rate of the most uncertain tenth, error-detection AUROC), like testEvaluation."
        ),
    )
    cross_site_accuracy: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        max_length=MAX_CROSS_SITE_SITES + 1,
        description=(
            "evaluation.crossSite: test accuracy of each model (each site's last local model, and "
            f"'{GLOBAL_MODEL_KEY}' for the final global model) on each site's test split: model -> site "
            "-> accuracy."
        ),
    )
    privacy_epsilon: float | None = Field(
        None,
        description=(
            "privacy.dp: epsilon at privacy.dp.delta spent by the training rounds so far, by the RDP "
            "accountant (Google's dp-accounting) over the sampled Gaussian mechanism of each round."
        ),
    )
    site_model_uris: dict[str, str] = Field(
        default_factory=dict,
        max_length=256,
        description=(
            "Per site, its own merged model (global shared tensors with its personal ones, LoRA "
            "folded in), written in the final evaluation when the spec publishes site models "
            "(exchange.siteModels, or mode localOnly)."
        ),
    )
    message: str | None = Field(None, description="What the training is doing or why it failed.")
    started_at: datetime | None = Field(None, description="When the training started.")
    finished_at: datetime | None = Field(None, description="When the training finished.")
    observed_generation: int | None = Field(None, description="Spec generation this status reflects.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Typed conditions.")
    site_states: dict[str, AttemptRef] = Field(
        default_factory=dict,
        description=(
            "Per site, the round and attempt whose private state (optimizer, schedule, data cursor) the "
            "site's next round starts from: that of its last accepted update, so a failed or rejected "
            "attempt never advances it."
        ),
    )

    def site(self, name: str) -> SiteRoundStatus:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# the resource


#: What metadata.name must be, and why (the API server takes any DNS subdomain; the operator less).
NAME_RULE: Final = (
    "must be a DNS label: lowercase letters, digits and '-', at most 63 characters, no dots "
    "(the aggregator's Service, ConfigMap and Secret are named after it; a dot would map "
    "a.b onto the objects of the training a-b)"
)


def name_problems(name: object) -> list[str]:
    """What is wrong with a training's metadata.name, for the operator, which reads bodies as dicts."""
    if isinstance(name, str) and len(name) <= 63 and re.fullmatch(DNS_LABEL, name):
        return []
    return [f"metadata.name: {NAME_RULE}"]


class ObjectMeta(BaseModel):
    """The metadata a file may carry; the API server fills in the rest (uid, creationTimestamp...)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    name: str = Field(..., max_length=253)
    namespace: str | None = Field(None, min_length=1, max_length=63, pattern=DNS_LABEL)
    generation: int | None = Field(None, ge=0, le=INT64_MAX)
    labels: dict[QualifiedName, LabelValue] = Field(default_factory=dict, max_length=64)
    # The API server allows 256 KiB of annotations in all (kubectl's last-applied-configuration is one).
    annotations: dict[QualifiedName, Annotated[str, Field(max_length=256 * 1024)]] = Field(
        default_factory=dict, max_length=64
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_label(cls, name: str) -> str:
        if name_problems(name):
            raise ValueError(NAME_RULE)
        return name


class FederatedTraining(SpecModel):
    # The API server accepts any DNS subdomain as a name; ObjectMeta above wants a DNS label.
    model_config = ConfigDict(
        json_schema_extra=_cel_rules(
            {
                "rule": "size(self.metadata.name) <= 63 && !self.metadata.name.contains('.')",
                "message": "metadata.name must be a DNS label: at most 63 characters and no dots",
            },
        )
    )

    api_version: str = Field(API_VERSION, max_length=64, description="fedtrain.io/v1alpha1.")
    kind: Literal["FederatedTraining"] = KIND
    metadata: ObjectMeta
    spec: FederatedTrainingSpec
    status: FederatedTrainingStatus | None = None

    @model_validator(mode="after")
    def _api_version_known(self) -> FederatedTraining:
        if self.api_version != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION}, not {self.api_version}")
        return self


def describe_errors(error: ValidationError, within: str = "") -> list[str]:
    """One line per problem, each naming the field as the user wrote it (spec.training.localSteps);
    `within` is where the validated object sits ("spec" for a spec validated alone)."""
    lines = []
    for problem in error.errors():
        where = ".".join(
            [within, *(str(part) for part in problem["loc"])] if within else map(str, problem["loc"])
        )
        lines.append(f"{where or '(document)'}: {_message(problem)}")
    return lines


def _message(problem: ErrorDetails) -> str:
    """What is wrong and, where the error names a shape, the fix."""
    kind, location = problem["type"], problem["loc"]
    field = str(location[-1]) if location else ""
    if kind == "extra_forbidden":
        if "_" in field and not field.startswith("_"):
            return f"unknown field: write {to_camel(field)} (fields are camelCase, as in examples/)"
        return "unknown field: check its spelling (fields are camelCase, as in examples/)"
    if kind == "finite_number":
        return "must be a finite number (not NaN or an infinity)"
    if kind == "model_type":
        class_name = str((problem.get("ctx") or {}).get("class_name", ""))
        return _expected_object(field, class_name, problem["input"])
    if kind == "dict_type":
        return "must be a mapping of key: value pairs"
    if kind == "list_type":
        return "must be a list (one '- item' per line, or [a, b])"
    if kind == "string_pattern_mismatch":
        pattern = str((problem.get("ctx") or {}).get("pattern", ""))
        meaning = _PATTERN_MEANINGS.get(pattern.removeprefix("^$|"))
        if meaning and pattern.startswith("^$|"):
            meaning = f"must be empty or {meaning.removeprefix('must be ')}"
        return f"{meaning} (the pattern {pattern})" if meaning else problem["msg"]
    if kind in ("int_type", "float_type", "bool_type") and isinstance(problem["input"], str):
        return f"{problem['msg']}, not the string {problem['input']!r}: write it without quotes"
    return problem["msg"].removeprefix("Value error, ")


_PATTERN_MEANINGS: Final = {
    DNS_LABEL: "must be a DNS label: lowercase letters, digits and '-', starting and ending with a "
    "letter or digit",
    # BUCKET is the same grammar, hence the same text.
    DNS_SUBDOMAIN: "must be a DNS subdomain, the form of Kubernetes names and S3 bucket names: lowercase "
    "letters, digits and '-', in labels joined by single dots",
    QUALIFIED_NAME: "must be a qualified name such as cpu, nvidia.com/gpu or kubernetes.io/hostname",
    LABEL_VALUE: "must be a label value: letters, digits, '-', '_' and '.', starting and ending with a "
    "letter or digit",
    ABSOLUTE_PATH: "must be an absolute path (not /) of letters, digits and -_+@=,~. with no '.' or "
    "'..' segment",
    RELATIVE_PATH: "must be a relative path of letters, digits and -_+@=,~. with no leading '/' and no "
    "'.' or '..' segment",
    DATA_PATH: "must be a path of letters, digits and -_+@=,~. with no '.' or '..' segment",
    SERVICE_URL: "must be an http(s)://host[:port][/path] URL without credentials, query or fragment",
    DATA_URL: "must be an http(s):// or file:// URL of a file, with no '.' or '..' in its path",
    MODEL_NAME: "must be a timm model name: lowercase letters, digits, '_' and '.'",
    CLASS_NAME: "must be usable as a directory name: no '/', no control characters, not '.' or '..'",
}


def _expected_object(field: str, class_name: str, given: Any) -> str:
    """'must be an object' with the shape to write: imageFolder: /dir -> imageFolder: {path: /dir}."""
    model = _api_models().get(class_name)
    if model is None:
        return "must be an object (key: value pairs)"
    names = [info.alias or name for name, info in model.model_fields.items()]
    required = [info.alias or name for name, info in model.model_fields.items() if info.is_required()]
    if isinstance(given, str | int | float) and not isinstance(given, bool) and len(required) == 1:
        return f"must be an object: write {field}: {{{required[0]}: {given}}}"
    return f"must be an object with the fields {', '.join(names)}"


def _api_models() -> dict[str, type[ApiModel]]:
    found: dict[str, type[ApiModel]] = {}
    pending: list[type[ApiModel]] = [ApiModel]
    while pending:
        model = pending.pop()
        found[model.__name__] = model
        pending.extend(model.__subclasses__())
    return found
