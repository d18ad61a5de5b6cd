"""Pure builders of every Kubernetes object the operator creates: plain dicts, no API calls.

Names are deterministic (training, site, round, attempt), so a restarted operator that creates an
object again gets "already exists" instead of a duplicate. Every object carries the labels that the
operator watches and cleans up by.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from fedtrain.api import API_VERSION, KIND, FederatedTrainingSpec, SiteSpec
from fedtrain.sealing import DataKey

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fedtrain-operator"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
TRAINING = "fedtrain.io/training"
TRAINING_NAMESPACE = "fedtrain.io/training-namespace"
TRAINING_UID = "fedtrain.io/training-uid"
SITE = "fedtrain.io/site"
ROUND = "fedtrain.io/round"
ATTEMPT = "fedtrain.io/attempt"
MODE = "fedtrain.io/mode"

AGGREGATOR_PORT = 8080
AGGREGATOR_PORT_NAME = "http"
JOB_CONFIG_DIR = "/etc/fedtrain/job"
JOB_CONFIG_FILE = "job.yaml"
TRAINING_DIR = "/etc/fedtrain/training"
TRAINING_FILE = "training.yaml"
TOKEN_DIR = "/etc/fedtrain/token"
TOKEN_KEY = "token"
#: privacy.encryptAtRest: the training's data key (base64), in the same Secret as the token.
DATA_KEY_KEY = "data-key"
RUN_AS = 1000
#: The math libraries' thread counts, set together for a trainer on a cluster and in a local run.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_DNS_UNSAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class TrainingRef:
    """The FederatedTraining an object belongs to."""

    namespace: str
    name: str
    uid: str

    def labels(self) -> dict[str, str]:
        return {
            MANAGED_BY: MANAGER,
            NAME_LABEL: "fedtrain",
            TRAINING: self.name,
            TRAINING_NAMESPACE: self.namespace,
            TRAINING_UID: self.uid,
        }

    def selector(self) -> str:
        """Label selector of everything the operator made for this training, in any namespace."""
        return f"{TRAINING_UID}={self.uid}"

    def owner_reference(self) -> dict[str, Any]:
        """Owner of the objects in the training's own namespace (garbage-collected with it)."""
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class PodDefaults:
    """What the operator's settings say about every pod it makes."""

    trainer_image: str
    aggregator_image: str
    image_pull_policy: str = "IfNotPresent"
    job_grace_seconds: int = 300
    job_ttl_seconds: int = 86400
    aggregator_resources: dict[str, Any] | None = None
    image_pull_secrets: tuple[str, ...] = ()


def dns_name(*parts: str | int, limit: int = 63) -> str:
    """A DNS-1035 label from parts: readable when short, a hash suffix keeps long ones unique."""
    readable = _DNS_UNSAFE.sub("-", "-".join(str(part).lower() for part in parts)).strip("-")
    if not readable[:1].isalpha():
        readable = f"ft-{readable}"
    if len(readable) <= limit:
        return readable
    digest = hashlib.sha256(readable.encode()).hexdigest()[:8]
    return f"{readable[: limit - 9].rstrip('-')}-{digest}"


def job_name(training: TrainingRef, site: str, round_index: int, attempt: int) -> str:
    """One name per (training, site, round, attempt): creating it twice can only fail, never duplicate.

    The training's namespace is hashed in, so two trainings of one name in different namespaces that
    share a site namespace never collide.
    """
    owner = hashlib.sha256(f"{training.namespace}/{training.name}".encode()).hexdigest()[:5]
    return dns_name(training.name, site, f"r{round_index}", f"a{attempt}", owner)


def aggregator_name(training: TrainingRef) -> str:
    return dns_name(training.name, "aggregator")


def token_secret_name(training: TrainingRef) -> str:
    return dns_name(training.name, "aggregator-token")


def _restricted_pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted_container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _scratch_env() -> list[dict[str, str]]:
    # The root filesystem is read-only: every library that caches or spools must use /tmp.
    return [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    ]


def _resources(site: SiteSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if site.resources.requests:
        resources["requests"] = {key: str(value) for key, value in site.resources.requests.items()}
    if site.resources.limits:
        resources["limits"] = {key: str(value) for key, value in site.resources.limits.items()}
    return resources


# --------------------------------------------------------------------------------------------------
# a site's trainer Job and its Secret


#: libyaml's emitter where PyYAML has it: the pure-Python one (4.6 ms for a job file, 0.5 ms with
#: libyaml) took a quarter of the operator's event loop at 50 trainings.
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def to_yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_DUMPER, sort_keys=False)


def to_job_file(document: dict[str, Any]) -> str:
    """A trainer's job file, made per Job: JSON (which is YAML too) takes 0.09 ms, libyaml 0.5 ms."""
    return json.dumps(document, indent=1)


def trainer_secret(
    training: TrainingRef,
    site: SiteSpec,
    round_index: int,
    attempt: int,
    job_config: dict[str, Any],
    job: dict[str, Any],
) -> dict[str, Any]:
    """The trainer's job file: its slice of the spec and presigned URLs, nothing else.

    It belongs to `job`, the Job as the API server returned it: the Job's TTL clean-up (or its
    deletion) takes the URLs with it.
    """
    name = job_name(training, site.name, round_index, attempt)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": site.namespace,
        "labels": _job_labels(training, site.name, round_index, attempt),
    }
    owner = job["metadata"]
    metadata["ownerReferences"] = [
        {"apiVersion": "batch/v1", "kind": "Job", "name": owner["name"], "uid": owner["uid"]}
    ]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata,
        "stringData": {JOB_CONFIG_FILE: to_job_file(job_config)},
    }


def _job_labels(training: TrainingRef, site: str, round_index: int, attempt: int) -> dict[str, str]:
    return {
        **training.labels(),
        COMPONENT: "trainer",
        SITE: site,
        ROUND: str(round_index),
        ATTEMPT: str(attempt),
    }


def _trainer_storage(name: str, site: SiteSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trainer's volume mounts and the pod's volumes: job file, scratch, shared memory, data."""
    mounts: list[dict[str, Any]] = [
        {"name": "job", "mountPath": JOB_CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        # PyTorch data loaders share batches through /dev/shm, which is 64 MiB in a container.
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "job", "secret": {"secretName": name, "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if site.data_volume is not None:
        mount: dict[str, Any] = {"name": "data", "mountPath": site.data_volume.mount_path, "readOnly": True}
        if site.data_volume.sub_path:
            mount["subPath"] = site.data_volume.sub_path
        mounts.append(mount)
        volumes.append(
            {
                "name": "data",
                "persistentVolumeClaim": {"claimName": site.data_volume.claim_name, "readOnly": True},
            }
        )
    return mounts, volumes


def _trainer_container(site: SiteSpec, defaults: PodDefaults, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "trainer",
        "image": defaults.trainer_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["python", "-m", "fedtrain.trainer"],
        "args": ["--config", f"{JOB_CONFIG_DIR}/{JOB_CONFIG_FILE}"],
        "env": _scratch_env() + _thread_env(site),
        "volumeMounts": mounts,
        "securityContext": _restricted_container_security(),
        # A crash's last log lines become the container's termination message (kubectl describe).
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = _resources(site)
    if resources:
        container["resources"] = resources
    return container


def cpu_threads(quantity: int | str) -> int | None:
    """Whole CPUs of a Kubernetes CPU quantity, rounded up ("500m" -> 1, "2" -> 2); None if unreadable."""
    text = str(quantity).strip()
    try:
        cores = int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return max(1, math.ceil(cores)) if cores > 0 else None


def _thread_env(site: SiteSpec) -> list[dict[str, str]]:
    """OMP/MKL threads: the site's own setting, else its CPU limit. In a container the math libraries
    would otherwise start a thread per core of the node and oversubscribe the cores the pod may use."""
    threads = site.threads
    if threads is None and "cpu" in site.resources.limits:
        threads = cpu_threads(site.resources.limits["cpu"])
    if threads is None:
        return []
    return [{"name": name, "value": str(threads)} for name in THREAD_VARIABLES]


def _site_placement(site: SiteSpec) -> dict[str, Any]:
    """The pod fields a site sets (where it runs, as whom, from which registry); unset ones left out."""
    optional: dict[str, Any] = {
        "nodeSelector": dict(site.node_selector) or None,
        "tolerations": [t.to_api() for t in site.tolerations] or None,
        "affinity": site.affinity,
        "priorityClassName": site.priority_class_name,
        "schedulerName": site.scheduler_name,
        "serviceAccountName": site.service_account_name,
        "imagePullSecrets": [{"name": secret} for secret in site.image_pull_secrets] or None,
    }
    return {key: value for key, value in optional.items() if value is not None}


def trainer_pod_spec(name: str, site: SiteSpec, defaults: PodDefaults) -> dict[str, Any]:
    """The pod of the trainer Job `name`: one container, restricted, placed where the site says."""
    mounts, volumes = _trainer_storage(name, site)
    return {
        "restartPolicy": "Never",
        # The trainer talks to nothing but presigned URLs: it needs no Kubernetes credentials.
        "automountServiceAccountToken": False,
        "securityContext": _restricted_pod_security(),
        "containers": [_trainer_container(site, defaults, mounts)],
        "volumes": volumes,
        **_site_placement(site),
    }


def trainer_job(
    training: TrainingRef,
    spec: FederatedTrainingSpec,
    site: SiteSpec,
    round_index: int,
    attempt: int,
    mode: str,
    defaults: PodDefaults,
) -> dict[str, Any]:
    name = job_name(training, site.name, round_index, attempt)
    labels = _job_labels(training, site.name, round_index, attempt)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": site.namespace,
            "labels": labels,
            "annotations": {MODE: mode},
        },
        "spec": {
            # The engine retries a failed site with a new attempt (a new Job), so Kubernetes must not.
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.aggregation.round_timeout_seconds + defaults.job_grace_seconds,
            "ttlSecondsAfterFinished": defaults.job_ttl_seconds,
            "template": {
                "metadata": {"labels": labels, "annotations": {MODE: mode}},
                "spec": trainer_pod_spec(name, site, defaults),
            },
        },
    }


# --------------------------------------------------------------------------------------------------
# the aggregator: Secret (token), ConfigMap (the training), Deployment, Service


def aggregator_labels(training: TrainingRef) -> dict[str, str]:
    return {**training.labels(), COMPONENT: "aggregator"}


def aggregator_selector(training: TrainingRef) -> dict[str, str]:
    return {TRAINING_UID: training.uid, COMPONENT: "aggregator"}


def token_secret(training: TrainingRef, token: str, data_key: DataKey | None = None) -> dict[str, Any]:
    """The training's Secret: the aggregator's bearer token and, under privacy.encryptAtRest, the data key."""
    data = {TOKEN_KEY: token, **({DATA_KEY_KEY: data_key.to_base64()} if data_key is not None else {})}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": token_secret_name(training),
            "namespace": training.namespace,
            "labels": aggregator_labels(training),
            "ownerReferences": [training.owner_reference()],
        },
        "stringData": data,
    }


def training_document(training: TrainingRef, spec: FederatedTrainingSpec) -> dict[str, Any]:
    """What the aggregator is told of its training: identity and spec."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": training.name, "namespace": training.namespace},
        "spec": spec.to_api(),
    }


def aggregator_config_map(training: TrainingRef, spec: FederatedTrainingSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": aggregator_name(training),
            "namespace": training.namespace,
            "labels": aggregator_labels(training),
            "ownerReferences": [training.owner_reference()],
        },
        "data": {TRAINING_FILE: to_yaml(training_document(training, spec))},
    }


def _config_hash(training: TrainingRef, spec: FederatedTrainingSpec) -> str:
    document = json.dumps(training_document(training, spec), sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest()[:16]


def _storage_credentials_env(spec: FederatedTrainingSpec) -> list[dict[str, Any]]:
    """The S3 credentials from the spec's Secret, if it names one (the session token is optional)."""
    storage = spec.storage
    if storage is None or not storage.credentials_secret:
        return []
    return [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": storage.credentials_secret, "key": key, "optional": optional}
            },
        }
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        )
    ]


def _aggregator_env(spec: FederatedTrainingSpec) -> list[dict[str, Any]]:
    data_key = (
        [{"name": "FEDTRAIN_AGGREGATOR_DATA_KEY_FILE", "value": f"{TOKEN_DIR}/{DATA_KEY_KEY}"}]
        if spec.privacy.encrypt_at_rest
        else []
    )
    return [
        *_scratch_env(),
        {"name": "FEDTRAIN_AGGREGATOR_TRAINING_FILE", "value": f"{TRAINING_DIR}/{TRAINING_FILE}"},
        {"name": "FEDTRAIN_AGGREGATOR_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
        *data_key,
        {"name": "FEDTRAIN_AGGREGATOR_PORT", "value": str(AGGREGATOR_PORT)},
        *_storage_credentials_env(spec),
    ]


def _aggregator_container(spec: FederatedTrainingSpec, defaults: PodDefaults) -> dict[str, Any]:
    probe_port = {"port": AGGREGATOR_PORT_NAME}
    container: dict[str, Any] = {
        "name": "aggregator",
        "image": defaults.aggregator_image,
        "imagePullPolicy": defaults.image_pull_policy,
        "command": ["python", "-m", "fedtrain.aggregator", "serve"],
        "env": _aggregator_env(spec),
        "ports": [{"name": AGGREGATOR_PORT_NAME, "containerPort": AGGREGATOR_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", **probe_port}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", **probe_port},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": [
            {"name": "training", "mountPath": TRAINING_DIR, "readOnly": True},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": _restricted_container_security(),
        # The operator names a crash-looping aggregator by its termination message: its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if defaults.aggregator_resources:
        container["resources"] = defaults.aggregator_resources
    return container


def aggregator_pod_spec(
    training: TrainingRef, spec: FederatedTrainingSpec, defaults: PodDefaults
) -> dict[str, Any]:
    """The aggregator's pod: the training file from the ConfigMap, the token from its Secret."""
    pull_secrets = [{"name": name} for name in defaults.image_pull_secrets]
    return {
        "automountServiceAccountToken": False,
        "securityContext": _restricted_pod_security(),
        **({"imagePullSecrets": pull_secrets} if pull_secrets else {}),
        "containers": [_aggregator_container(spec, defaults)],
        "volumes": [
            {"name": "training", "configMap": {"name": aggregator_name(training)}},
            {
                "name": "token",
                "secret": {"secretName": token_secret_name(training), "defaultMode": 0o440},
            },
            {"name": "tmp", "emptyDir": {}},
        ],
    }


def aggregator_deployment(
    training: TrainingRef, spec: FederatedTrainingSpec, defaults: PodDefaults
) -> dict[str, Any]:
    labels = aggregator_labels(training)
    # A changed spec changes the ConfigMap; this annotation rolls the pod so it reads the new one.
    annotations = {"fedtrain.io/config-hash": _config_hash(training, spec)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": aggregator_name(training),
            "namespace": training.namespace,
            "labels": labels,
            "ownerReferences": [training.owner_reference()],
        },
        "spec": {
            "replicas": 1,
            # Two aggregators of one training would each hold half the round: never overlap them.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": aggregator_selector(training)},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": aggregator_pod_spec(training, spec, defaults),
            },
        },
    }


def aggregator_service(training: TrainingRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": aggregator_name(training),
            "namespace": training.namespace,
            "labels": aggregator_labels(training),
            "ownerReferences": [training.owner_reference()],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": aggregator_selector(training),
            "ports": [
                {
                    "name": AGGREGATOR_PORT_NAME,
                    "port": AGGREGATOR_PORT,
                    "targetPort": AGGREGATOR_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }
