"""The operator's settings: environment variables with one prefix, checked once at start-up."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fedtrain.api import MAX_ROUND_TIMEOUT_SECONDS
from fedtrain.store import MAX_PRESIGN_SECONDS

ENV_PREFIX = "FEDTRAIN_OPERATOR_"


class OperatorSettings(BaseSettings):
    """Everything the operator can be told, as FEDTRAIN_OPERATOR_<NAME> environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated namespaces whose FederatedTrainings are served; empty: all namespaces.",
    )
    kubeconfig: Path | None = Field(
        None, description="A kubeconfig file to use; default: in a pod its service account, else $KUBECONFIG."
    )
    trainer_image: str = Field(
        "ghcr.io/fedtrain/trainer:0.1.0", min_length=1, description="Image of the site trainer Jobs."
    )
    aggregator_image: str = Field(
        "ghcr.io/fedtrain/aggregator:0.1.0", min_length=1, description="Image of the aggregator Deployment."
    )
    image_pull_policy: str = Field(
        "IfNotPresent", pattern="^(Always|IfNotPresent|Never)$", description="Pull policy of both images."
    )
    image_pull_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated Secret names the aggregator pods pull their image with (in each training's "
            "namespace); trainer pods take theirs from spec.sites[].imagePullSecrets."
        ),
    )
    presign_grace_seconds: int = Field(
        900,
        ge=60,
        # With the longest round timeout, URLs then live exactly S3's limit of 7 days.
        le=MAX_PRESIGN_SECONDS - MAX_ROUND_TIMEOUT_SECONDS,
        description=(
            "Presigned URLs handed to a trainer expire this long after the round's timeout "
            "(aggregation.roundTimeoutSeconds): short-lived, yet valid for the whole attempt."
        ),
    )
    job_grace_seconds: int = Field(
        300,
        ge=0,
        description="A trainer Job's activeDeadlineSeconds is the round timeout plus this grace.",
    )
    job_ttl_seconds: int = Field(
        86400,
        ge=60,
        description=(
            "ttlSecondsAfterFinished of trainer Jobs. Keep it longer than a round: a Job removed "
            "before the operator saw it finish is started again."
        ),
    )
    aggregator_url: str | None = Field(
        None,
        description=(
            "URL template of a training's aggregator, with {namespace}, {service} and {port}; for an "
            "operator outside the cluster, e.g. through `kubectl proxy`: http://127.0.0.1:8001/api/v1/"
            "namespaces/{namespace}/services/{service}:{port}/proxy. Default: the Service's cluster DNS name."
        ),
    )
    aggregator_pod_url: str | None = Field(
        None,
        description=(
            "URL template of one aggregator pod, with {namespace}, {pod}, {ip} and {port}: where the "
            "operator asks a running pod that is not ready why (its /readyz). For an operator outside "
            "the cluster, e.g. http://127.0.0.1:8001/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy. "
            "Default: the pod's IP."
        ),
    )
    aggregator_timeout_seconds: float = Field(
        600, gt=0, description="How long one aggregator call (a fold, a close, a merge) may take."
    )
    aggregator_resources: dict[str, Any] = Field(
        default_factory=lambda: {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        description="Resources of the aggregator container, as JSON (requests and limits).",
    )
    api_concurrency: int = Field(
        32,
        ge=1,
        le=512,
        description=(
            "Kubernetes API calls in flight at once (worker threads and pooled connections): "
            "a round of many sites starts its Jobs together."
        ),
    )
    resync_seconds: float = Field(
        30, gt=0, description="A training is reconciled at least this often, even with nothing to wake it."
    )
    leader_election: bool = Field(
        False, description="Hold a Lease before acting, so that of several replicas only one ever acts."
    )
    lease_name: str = Field("fedtrain-operator", min_length=1, description="Name of the leader Lease.")
    lease_namespace: str = Field(
        "default", min_length=1, description="Namespace of the leader Lease (the operator's own)."
    )
    lease_duration_seconds: int = Field(
        15, ge=1, description="A leader that has not renewed its Lease for this many seconds is replaced."
    )
    lease_renew_seconds: float = Field(5, gt=0, description="How often the leader renews its Lease.")
    identity: str = Field(
        default_factory=socket.gethostname, min_length=1, description="This replica's name in the Lease."
    )
    liveness_port: int | None = Field(
        8080, ge=1, le=65535, description="Port of kopf's /healthz liveness endpoint; unset: none."
    )
    log_level: str = Field(
        "INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR)$",
        description="Log level: DEBUG adds each action's duration; WARNING keeps only the problems.",
    )
    metrics_port: int | None = Field(
        8081, ge=1, le=65535, description="Port of the Prometheus /metrics endpoint; unset: none."
    )

    @field_validator("namespaces", "image_pull_secrets", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    def aggregator_pod_base_url(self, namespace: str, pod: str, ip: str, port: int) -> str:
        template = self.aggregator_pod_url or "http://{ip}:{port}"
        return template.format(namespace=namespace, pod=pod, ip=ip, port=port).rstrip("/")

    def aggregator_base_url(self, namespace: str, service: str, port: int) -> str:
        template = self.aggregator_url or "http://{service}.{namespace}.svc:{port}"
        return template.format(namespace=namespace, service=service, port=port).rstrip("/")
