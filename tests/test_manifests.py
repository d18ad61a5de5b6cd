"""The operator's manifest builders: valid Kubernetes objects, for a minimal and a fully loaded site."""

from __future__ import annotations

import dataclasses
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedtrain.api import FederatedTrainingSpec
from fedtrain.operator import manifests
from fedtrain.operator.manifests import PodDefaults, TrainingRef
from fedtrain.sealing import DataKey

KUBERNETES_VERSIONS = ["1.30", "1.33"]

TRAINING = TrainingRef(namespace="research", name="wafer-defects", uid="0a1b2c3d-0000-4000-8000-000000000001")
DEFAULTS = PodDefaults(
    trainer_image="registry.example/fedtrain/trainer:0.1.0",
    aggregator_image="registry.example/fedtrain/aggregator:0.1.0",
    aggregator_resources={"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
)

MINIMAL_SITE: dict[str, Any] = {"name": "fab-a", "data": {"synthetic": {}}}
LOADED_SITE: dict[str, Any] = {
    "name": "fab-hsinchu",
    "namespace": "fab-hsinchu",
    "data": {"npz": {"path": "/data/wafers/maps.npz"}},
    "dataVolume": {"claimName": "wafer-maps", "mountPath": "/data", "subPath": "2026"},
    "resources": {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1},
        "limits": {"memory": "24Gi", "nvidia.com/gpu": 1},
    },
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "dedicated",
            "operator": "Equal",
            "value": "training",
            "effect": "NoExecute",
            "tolerationSeconds": 600,
        },
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "topology.kubernetes.io/zone",
                                "operator": "In",
                                "values": ["tw-1a", "tw-1b"],
                            }
                        ]
                    }
                ]
            }
        }
    },
    "priorityClassName": "training-high",
    "schedulerName": "volcano",
    "serviceAccountName": "fedtrain-trainer",
    "imagePullSecrets": ["registry-credentials"],
}


def spec_with(site: dict[str, Any]) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"name": "vit_small_patch14_dinov2", "numClasses": 9, "imageSize": 28},
            "storage": {"bucket": "fedtrain-models", "credentialsSecret": "fedtrain-s3"},
            "sites": [site],
        }
    )


def valid(manifest: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(manifest, desired_version=version, strict=True)


@pytest.mark.parametrize("site", [MINIMAL_SITE, LOADED_SITE], ids=["minimal", "loaded"])
def test_trainer_job_and_secret_validate(site: dict[str, Any]) -> None:
    spec = spec_with(site)
    site_spec = spec.sites[0]
    job = manifests.trainer_job(TRAINING, spec, site_spec, 3, 1, "train", DEFAULTS)
    created = {**job, "metadata": {**job["metadata"], "uid": "6f1c0d2e-0000-4000-8000-000000000001"}}
    config = {"round": 3, "site": site_spec.name}
    secret = manifests.trainer_secret(TRAINING, site_spec, 3, 1, config, created)
    valid(job)
    valid(secret)
    assert job["metadata"]["namespace"] == site_spec.namespace
    assert secret["metadata"]["name"] == job["metadata"]["name"]
    # The Secret belongs to its Job: the Job's TTL removes the presigned URLs with it.
    [owner] = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Job",
        job["metadata"]["name"],
        created["metadata"]["uid"],
    )
    assert yaml.safe_load(secret["stringData"]["job.yaml"]) == {"round": 3, "site": site_spec.name}


def test_loaded_site_reaches_the_pod() -> None:
    spec = spec_with(LOADED_SITE)
    job = manifests.trainer_job(TRAINING, spec, spec.sites[0], 0, 0, "train", DEFAULTS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == LOADED_SITE["nodeSelector"]
    assert pod["tolerations"][1] == LOADED_SITE["tolerations"][1]
    assert pod["affinity"] == LOADED_SITE["affinity"]
    assert (pod["priorityClassName"], pod["schedulerName"], pod["serviceAccountName"]) == (
        "training-high",
        "volcano",
        "fedtrain-trainer",
    )
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    data_mount = next(m for m in container["volumeMounts"] if m["name"] == "data")
    assert data_mount == {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "2026"}
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]
    assert claim == {"claimName": "wafer-maps", "readOnly": True}


def test_trainer_pod_is_restricted() -> None:
    spec = spec_with(MINIMAL_SITE)
    job = manifests.trainer_job(TRAINING, spec, spec.sites[0], 0, 0, "train", DEFAULTS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == spec.aggregation.round_timeout_seconds + 300
    assert job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod


@pytest.mark.parametrize("site", [MINIMAL_SITE, LOADED_SITE], ids=["minimal", "loaded"])
def test_aggregator_objects_validate(site: dict[str, Any]) -> None:
    spec = spec_with(site)
    deployment = manifests.aggregator_deployment(TRAINING, spec, DEFAULTS)
    service = manifests.aggregator_service(TRAINING)
    for manifest in (
        deployment,
        service,
        manifests.token_secret(TRAINING, "s3cr3t"),
        manifests.aggregator_config_map(TRAINING, spec),
    ):
        valid(manifest)
        assert manifest["metadata"]["namespace"] == TRAINING.namespace
        assert manifest["metadata"]["ownerReferences"][0]["uid"] == TRAINING.uid
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    env = {item["name"]: item for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "fedtrain-s3"
    assert "imagePullSecrets" not in deployment["spec"]["template"]["spec"]  # none configured

    private = dataclasses.replace(DEFAULTS, image_pull_secrets=("aggregator-pull",))
    pulled = manifests.aggregator_deployment(TRAINING, spec, private)
    valid(pulled)
    assert pulled["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "aggregator-pull"}]


def test_a_sealed_training_hands_its_aggregator_the_data_key_file() -> None:
    plain = spec_with(MINIMAL_SITE)
    sealed = plain.model_copy(update={"privacy": plain.privacy.model_copy(update={"encrypt_at_rest": True})})

    def env(spec: Any) -> dict[str, str]:
        container = manifests.aggregator_deployment(TRAINING, spec, DEFAULTS)["spec"]["template"]["spec"]
        return {item["name"]: item.get("value", "") for item in container["containers"][0]["env"]}

    assert "FEDTRAIN_AGGREGATOR_DATA_KEY_FILE" not in env(plain)
    assert (
        env(sealed)["FEDTRAIN_AGGREGATOR_DATA_KEY_FILE"] == f"{manifests.TOKEN_DIR}/{manifests.DATA_KEY_KEY}"
    )
    secret = manifests.token_secret(TRAINING, "s3cr3t", DataKey.generate())
    valid(secret)
    assert sorted(secret["stringData"]) == sorted([manifests.TOKEN_KEY, manifests.DATA_KEY_KEY])


def test_config_change_rolls_the_aggregator() -> None:
    spec = spec_with(MINIMAL_SITE)
    before = manifests.aggregator_deployment(TRAINING, spec, DEFAULTS)
    grown = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 50})})
    after = manifests.aggregator_deployment(TRAINING, grown, DEFAULTS)
    key = "fedtrain.io/config-hash"
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != (after["spec"]["template"]["metadata"]["annotations"][key])
    )


def test_job_names_are_deterministic_unique_and_valid() -> None:
    names = {
        manifests.job_name(TRAINING, site, round_index, attempt)
        for site in ("fab-a", "fab-b")
        for round_index in range(3)
        for attempt in range(2)
    }
    assert len(names) == 12
    assert manifests.job_name(TRAINING, "fab-a", 1, 0) == manifests.job_name(TRAINING, "fab-a", 1, 0)
    elsewhere = TrainingRef(namespace="other", name=TRAINING.name, uid="another-uid")
    assert manifests.job_name(elsewhere, "fab-a", 1, 0) != manifests.job_name(TRAINING, "fab-a", 1, 0)
    long = TrainingRef(namespace="n", name="x" * 63, uid="u")
    name = manifests.job_name(long, "y" * 40, 12345, 9)
    assert len(name) <= 63
    assert name != manifests.job_name(long, "y" * 40, 12345, 8)
    assert manifests.dns_name("9lives") == "ft-9lives"


@pytest.mark.parametrize(
    ("threads", "limits", "expected"),
    [
        (None, {}, None),
        (None, {"cpu": "500m"}, "1"),
        (None, {"cpu": "2500m"}, "3"),
        (None, {"cpu": 4}, "4"),
        (3, {"cpu": 8}, "3"),  # the site's own setting wins
    ],
)
def test_trainer_threads_follow_the_site_setting_or_its_cpu_limit(
    threads: int | None, limits: dict[str, object], expected: str | None
) -> None:
    spec = FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "storage": {"bucket": "models"},
            "sites": [
                {
                    "name": "fab-a",
                    "data": {"synthetic": {}},
                    "threads": threads,
                    "resources": {"limits": limits},
                }
            ],
        }
    )
    ref = TrainingRef(namespace="research", name="wafer", uid="uid-1")
    defaults = PodDefaults(trainer_image="trainer:1", aggregator_image="aggregator:1")
    job = manifests.trainer_job(ref, spec, spec.sites[0], 0, 0, "train", defaults)
    env = {
        item["name"]: item.get("value") for item in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env.get("OMP_NUM_THREADS") == expected
    assert env.get("MKL_NUM_THREADS") == expected
