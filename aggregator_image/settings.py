"""Settings of the aggregator service, from FEDTRAIN_AGGREGATOR_* environment variables.

The operator writes the training into a ConfigMap file and the bearer token into a Secret file;
S3 credentials are the standard AWS variables (boto3's default chain), never settings of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedtrain.api import FederatedTraining, describe_errors
from fedtrain.layout import TrainingLayout
from fedtrain.pretrained import load_pretrained
from fedtrain.resource import InvalidResourceError, load_resource
from fedtrain.sealing import DataKey, load_key_file
from fedtrain.store import S3Store

ENV_PREFIX = "FEDTRAIN_AGGREGATOR_"

#: Longer than the operator's client keeps an idle connection (aiohttp: 15 s): a server that closed
#: it sooner would race the operator's next request on it.
KEEP_ALIVE_SECONDS = 30
#: The request line and headers together; uvicorn's default (16 KiB), stated so it stays a bound.
H11_MAX_INCOMPLETE_EVENT_BYTES = 16 * 1024
#: Time for a request's line and headers (a few hundred bytes) to arrive.
HEADER_TIMEOUT_SECONDS = 10.0

#: The namespace of a training file whose metadata names none, as kubectl would assume.
DEFAULT_NAMESPACE = "default"


class SettingsError(ValueError):
    """Settings the service cannot start with; each problem names the variable to fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class AggregatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    training_file: Path = Field(
        ...,
        description=(
            "YAML or JSON file holding the FederatedTraining resource (apiVersion, kind, metadata.name, "
            "metadata.namespace, spec with spec.storage)."
        ),
    )
    token: SecretStr | None = Field(
        None, description="Bearer token every /v1 request must carry; set this or TOKEN_FILE."
    )
    token_file: Path | None = Field(
        None, description="File holding the bearer token (a mounted Secret key); set this or TOKEN."
    )
    data_key_file: Path | None = Field(
        None,
        description=(
            "File holding the training's data key (32 bytes, raw or base64; a mounted Secret key, mode "
            "0400 or 0440), which privacy.encryptAtRest needs to seal and open the objects in the bucket."
        ),
    )
    host: str = Field("0.0.0.0", description="Address to listen on (all interfaces: the pod's port).")
    port: int = Field(8080, ge=1, le=65535, description="Port to listen on.")
    serve_docs: bool = Field(
        False,
        description="Serve the OpenAPI schema and its pages (/openapi.json, /docs, /redoc), without a token.",
    )
    max_body_bytes: int = Field(
        2 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Largest request body read, else 413 (the largest close request is about 1.1 MB).",
    )
    body_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Time a client has to send its whole request body; then 408."
    )
    max_site_samples: int = Field(
        10_000_000,
        ge=1,
        description=(
            "Most samples an update may report for a site whose data size the spec does not state "
            "(npz, imageFolder); a synthetic site's bound is its samples. Beyond it the update is rejected."
        ),
    )
    header_timeout_seconds: float = Field(
        HEADER_TIMEOUT_SECONDS,
        gt=0,
        le=600,
        description="Time a client has to send a request's line and headers; then the connection is closed.",
    )
    limit_concurrency: int = Field(
        64, ge=4, le=10_000, description="Connections and requests served at once; more are answered 503."
    )

    @model_validator(mode="after")
    def _one_token(self) -> AggregatorSettings:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(
                f"set exactly one of {ENV_PREFIX}TOKEN and {ENV_PREFIX}TOKEN_FILE "
                f"({'both are' if self.token is not None else 'neither is'} set)"
            )
        return self

    def bearer_token(self) -> str:
        """The token, read from TOKEN_FILE if that is how it was given (a Secret file ends in a newline)."""
        if self.token is not None:
            token = self.token.get_secret_value().strip()
            variable = f"{ENV_PREFIX}TOKEN"
        else:
            assert self.token_file is not None  # _one_token
            variable = f"{ENV_PREFIX}TOKEN_FILE={self.token_file}"
            try:
                token = self.token_file.read_text().strip()
            except (OSError, UnicodeDecodeError) as error:
                raise SettingsError([f"{variable}: cannot read the token: {error}"]) from None
        if not token:
            raise SettingsError([f"{variable}: the token is empty"])
        return token

    def data_key(self, resource: FederatedTraining) -> DataKey | None:
        """The data key, read from DATA_KEY_FILE where the training's privacy.encryptAtRest needs one."""
        if not resource.spec.privacy.encrypt_at_rest:
            return None
        variable = f"{ENV_PREFIX}DATA_KEY_FILE"
        if self.data_key_file is None:
            raise SettingsError([f"{variable}: is not set; the training's privacy.encryptAtRest needs it"])
        try:
            return load_key_file(self.data_key_file)
        except (OSError, ValueError) as error:
            raise SettingsError([f"{variable}={self.data_key_file}: {error}"]) from None

    def training(self) -> FederatedTraining:
        """The training resource, which must name its storage: the aggregator works only through S3."""
        variable = f"{ENV_PREFIX}TRAINING_FILE={self.training_file}"
        try:
            resource = load_resource(self.training_file)
        except InvalidResourceError as error:
            raise SettingsError([f"{variable}: {problem}" for problem in error.problems]) from None
        if resource.spec.object_storage is None:
            raise SettingsError(
                [f"{variable}: spec.storage is required: the aggregator keeps models and updates in S3"]
            )
        return resource


def load_settings(
    training_file: Path | None = None, host: str | None = None, port: int | None = None
) -> AggregatorSettings:
    """Settings from the environment; the arguments (command-line options) take precedence when given."""
    given: dict[str, Any] = {"training_file": training_file, "host": host, "port": port}
    try:
        return AggregatorSettings(**{name: value for name, value in given.items() if value is not None})
    except ValidationError as error:
        problems = []
        for line, problem in zip(describe_errors(error), error.errors(), strict=True):
            field = str(problem["loc"][0]) if problem["loc"] else ""
            # Name the variable the operator (or a person) sets, not the Python field.
            where = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
            message = "is not set" if problem["type"] == "missing" else line.partition(": ")[2]
            problems.append(f"{where}: {message}")
        raise SettingsError(problems) from None


def layout_of(resource: FederatedTraining) -> TrainingLayout:
    return TrainingLayout(resource.metadata.namespace or DEFAULT_NAMESPACE, resource.metadata.name)


def store_of(resource: FederatedTraining) -> S3Store:
    """The training's store; keys left to boto3's default chain (AWS_ACCESS_KEY_ID, IRSA, ...)."""
    storage = resource.spec.object_storage
    if storage is None:
        raise SettingsError(["spec.storage is required: the aggregator keeps models and updates in S3"])
    return S3Store.from_spec(storage)


def pretrained_weights(resource: FederatedTraining) -> Path | bytes | None:
    """Base weights for initialize() and merge(): a uri source is read through the training's endpoint
    with the pod's own credentials (the standard AWS variables); hub weights are left to timm."""
    return load_pretrained(resource.spec, S3Store.from_spec)
