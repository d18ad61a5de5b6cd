"""Unit tests of the kopf reconciler's parts, each against hand-built bodies and a recording client.

No API server and no S3 server: `RecordingKube` stands in for `Kube` and records every call, and
presigning needs no network. The end-to-end tests (test_operator.py) run the parts together.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml
from operator_harness import ACCESS_KEY, CREDENTIALS_SECRET, SECRET_KEY, TRAINING_NAMESPACE, tiny_training
from prometheus_client import CollectorRegistry
from recording_kube import Call, RecordingKube, merge

from fedtrain.api import (
    KIND,
    AttemptRef,
    FederatedTraining,
    FederatedTrainingSpec,
    FederatedTrainingStatus,
    Phase,
    RoundRecord,
    StorageSpec,
)
from fedtrain.errors import TemporaryError
from fedtrain.job import TrainerJob, parse_job_file
from fedtrain.layout import TrainingLayout
from fedtrain.messages import UpdateVerdict
from fedtrain.operator import manifests
from fedtrain.operator.cleanup import cleanup_targets, remove_training_objects
from fedtrain.operator.core import (
    MAX_PRESIGN_SECONDS,
    DriverCore,
    RoundMemory,
    build_trainer_job,
    url_expiry_seconds,
)
from fedtrain.operator.credentials import KubeCredentials
from fedtrain.operator.engine import JobObservation, JobState, StartSiteJob, StopSiteJob, step
from fedtrain.operator.handlers import failed_reconcile
from fedtrain.operator.history import StoreHistory, append_record
from fedtrain.operator.jobs import JobTable, KubeJobs, job_observation
from fedtrain.operator.kube import KubeError
from fedtrain.operator.manifests import PodDefaults, TrainingRef
from fedtrain.operator.metrics import OperatorMetrics
from fedtrain.operator.provisioning import Provisioner, pod_problem
from fedtrain.operator.reconcile import (
    Context,
    Reconciler,
    training_ref,
    unserved_site_namespaces,
    validate_spec,
)
from fedtrain.operator.settings import OperatorSettings
from fedtrain.operator.status_writer import StatusWriter
from fedtrain.sealing import DataKey
from fedtrain.store import LocalStore, S3Store

ENDPOINT = "http://minio.example:9000"
BUCKET = "fedtrain-runs"
UID = "0b7c1a52-5f0e-4a8e-9d55-7a4d6c1f0e01"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DEFAULTS = PodDefaults(trainer_image="fedtrain/trainer:test", aggregator_image="fedtrain/aggregator:test")


def training_body(name: str = "wafer", **spec: Any) -> dict[str, Any]:
    """A FederatedTraining as the API server hands it over: with uid and generation, validated."""
    body = tiny_training(name, BUCKET, ENDPOINT, **spec)
    body["metadata"].update(uid=UID, generation=1)
    FederatedTraining.model_validate(body)
    return body


def spec_of(body: Mapping[str, Any]) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(body["spec"])


@pytest.fixture
def body() -> dict[str, Any]:
    return training_body()


@pytest.fixture
def ref(body: dict[str, Any]) -> TrainingRef:
    return training_ref(body)


@pytest.fixture
def kube() -> RecordingKube:
    return RecordingKube()


class FakeSigner:
    """Signs by spelling out what was asked: the URL names the verb, the key and the expiry."""

    def presign_get(self, key: str, expires_seconds: int) -> str:
        return f"https://signed.example/GET/{key}?expires={expires_seconds}"

    def presign_put(self, key: str, expires_seconds: int) -> str:
        return f"https://signed.example/PUT/{key}?expires={expires_seconds}"


def job_status(conditions: list[dict[str, str]] | None = None, **counters: int) -> dict[str, Any]:
    return {"metadata": {"name": "j"}, "status": {"conditions": conditions or [], **counters}}


def trainer_job_object(
    ref: TrainingRef, site: str, round_index: int, attempt: int, **status: Any
) -> dict[str, Any]:
    """A trainer Job as the watch reports it: labelled as `manifests.trainer_job` labels it."""
    return {
        "kind": "Job",
        "metadata": {
            "name": manifests.job_name(ref, site, round_index, attempt),
            "namespace": "site-a",
            "labels": {
                **ref.labels(),
                manifests.SITE: site,
                manifests.ROUND: str(round_index),
                manifests.ATTEMPT: str(attempt),
            },
        },
        "status": status,
    }


# --------------------------------------------------------------------------------------------------
# the recording client itself: its answers are Kube's


@pytest.mark.asyncio
async def test_recording_kube_answers_like_kube(kube: RecordingKube) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "1"}},
        "stringData": {"k": "v"},
    }
    created = await kube.create(secret)
    assert created is not None
    assert created["metadata"]["uid"]
    assert created["data"] == {"k": base64.b64encode(b"v").decode()}
    assert await kube.create(secret) is None
    assert await kube.secret_data("ns", "s") == {"k": "v"}
    assert await kube.read("Secret", "ns", "absent") is None
    assert await kube.patch("Secret", "ns", "absent", {"data": {}}) is None
    patched = await kube.patch("Secret", "ns", "s", {"metadata": {"labels": {"a": None, "b": "2"}}})
    assert patched is not None
    assert patched["metadata"]["labels"] == {"b": "2"}
    assert await kube.list_labelled("Secret", "ns", {"b": "2"}) != []
    assert await kube.list_labelled("Secret", "ns", {"a": "1"}) == []
    assert await kube.delete("Secret", "ns", "s") is True
    assert await kube.delete("Secret", "ns", "s") is False
    assert await kube.patch_training_status("ns", "gone", {"round": 1}) is False
    assert kube.methods() == [
        "create", "create", "secret_data", "read", "patch", "patch", "list", "list", "delete", "delete",
        "patch_status",
    ]  # fmt: skip
    kube.forbid("Job", "ns", status=500)
    with pytest.raises(KubeError) as raised:
        await kube.read("Job", "ns", "j")
    assert raised.value.status == 500


def test_merge_is_rfc_7386() -> None:
    # The examples of RFC 7386, appendix A, that involve objects.
    assert merge({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge({"a": "b", "b": "c"}, {"a": None}) == {"b": "c"}
    assert merge({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


# --------------------------------------------------------------------------------------------------
# jobs


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (job_status([{"type": "Complete", "status": "True"}]), JobObservation(JobState.SUCCEEDED)),
        (job_status([{"type": "SuccessCriteriaMet", "status": "True"}]), JobObservation(JobState.SUCCEEDED)),
        (job_status(succeeded=1), JobObservation(JobState.SUCCEEDED)),
        (
            job_status([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "x"}]),
            JobObservation(JobState.FAILED, "DeadlineExceeded: x"),
        ),
        (
            job_status([{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]),
            JobObservation(JobState.FAILED, "BackoffLimitExceeded: the trainer failed"),
        ),
        (
            job_status([{"type": "Failed", "status": "True"}]),
            JobObservation(JobState.FAILED, "Failed: the trainer failed"),
        ),
        (job_status([{"type": "Failed", "status": "False"}], active=1), JobObservation(JobState.ACTIVE)),
        (job_status(active=1), JobObservation(JobState.ACTIVE)),
        ({"metadata": {"name": "new"}}, JobObservation(JobState.ACTIVE)),
    ],
    ids=[
        "complete", "success-criteria-met", "succeeded-counter", "failed-with-reason", "failure-target",
        "failed-without-reason", "false-condition-ignored", "running", "no-status-yet",
    ],
)  # fmt: skip
def test_job_observation(job: dict[str, Any], expected: JobObservation) -> None:
    assert job_observation(job) == expected


def test_job_table_ignores_unlabelled_jobs_and_forgets_deleted_ones(ref: TrainingRef) -> None:
    table = JobTable()
    assert (
        table.update({"metadata": {"name": "someone-elses", "labels": {"app": "x"}}}, deleted=False) is None
    )
    unlabelled_round = trainer_job_object(ref, "fab-a", 0, 0)
    del unlabelled_round["metadata"]["labels"][manifests.ROUND]
    assert table.update(unlabelled_round, deleted=False) is None
    no_uid = trainer_job_object(ref, "fab-a", 0, 0)
    del no_uid["metadata"]["labels"][manifests.TRAINING_UID]
    assert table.update(no_uid, deleted=False) is None
    assert table.by_training == {}

    job = trainer_job_object(ref, "fab-a", 0, 0, succeeded=1)
    assert table.update(job, deleted=False) == ref.uid
    assert table.round_view(ref.uid, 0) == {("fab-a", 0): JobObservation(JobState.SUCCEEDED)}
    assert table.update(job, deleted=True) == ref.uid
    assert table.round_view(ref.uid, 0) == {}


def test_job_table_round_view_holds_only_that_round(ref: TrainingRef) -> None:
    table = JobTable()
    table.update(trainer_job_object(ref, "fab-a", 0, 0, succeeded=1), deleted=False)
    table.update(trainer_job_object(ref, "fab-a", 1, 0, active=1), deleted=False)
    table.update(trainer_job_object(ref, "fab-b", 1, 1, active=1), deleted=False)
    other = TrainingRef(namespace=ref.namespace, name="other", uid="another-uid")
    table.update(trainer_job_object(other, "fab-a", 1, 0, succeeded=1), deleted=False)
    assert table.round_view(ref.uid, 1) == {
        ("fab-a", 0): JobObservation(JobState.ACTIVE),
        ("fab-b", 1): JobObservation(JobState.ACTIVE),
    }
    assert table.round_view(ref.uid, 0) == {("fab-a", 0): JobObservation(JobState.SUCCEEDED)}
    assert table.round_view(ref.uid, 2) == {}
    table.forget(ref.uid)
    assert table.round_view(ref.uid, 1) == {}
    assert table.round_view(other.uid, 1) == {("fab-a", 0): JobObservation(JobState.SUCCEEDED)}


def test_a_job_file_reads_back_the_same_from_either_driver(body: dict[str, Any], ref: TrainingRef) -> None:
    """The operator's JSON job file and the local runner's YAML one give the trainer the same job,
    floats without a dot included (1e-05 is JSON, and a string to YAML 1.1)."""
    body["spec"]["aggregation"]["weighting"] = "uniform"
    body["spec"]["privacy"] = {"clipNorm": 0.5, "dp": {"noiseMultiplier": 1.1, "delta": 1e-5}}
    trainer_job = _trainer_job(
        spec_of(body), ref, StartSiteJob(site="fab-b", round=1, attempt=0, mode="train")
    )
    document = trainer_job.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert '"delta": 1e-05' in manifests.to_job_file(document)
    for text in (manifests.to_job_file(document), yaml.safe_dump(document, sort_keys=False)):
        assert TrainerJob.model_validate(parse_job_file(text)) == trainer_job


def _trainer_job(spec: FederatedTrainingSpec, ref: TrainingRef, action: StartSiteJob) -> TrainerJob:
    layout = TrainingLayout(ref.namespace, ref.name)
    return build_trainer_job(spec, layout, action, FakeSigner(), 600, None)


@pytest.mark.asyncio
async def test_start_creates_the_job_then_its_secret_owned_by_it(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    spec = spec_of(body)
    table = JobTable()
    jobs = KubeJobs(kube, table, ref, spec, DEFAULTS)
    action = StartSiteJob(site="fab-b", round=1, attempt=2, mode="train")
    trainer_job = _trainer_job(spec, ref, action)
    await jobs.start(action, trainer_job)

    name = manifests.job_name(ref, "fab-b", 1, 2)
    assert [(c.method, c.kind, c.namespace, c.name) for c in kube.calls] == [
        ("create", "Job", "site-b", name),
        ("create", "Secret", "site-b", name),
    ]
    job = kube.get("Job", "site-b", name)
    secret = kube.get("Secret", "site-b", name)
    assert job is not None
    assert secret is not None
    assert job["metadata"]["labels"][manifests.TRAINING_UID] == ref.uid
    owners = secret["metadata"]["ownerReferences"]
    assert owners == [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job["metadata"]["uid"]}]
    job_file = (await kube.secret_data("site-b", name) or {})[manifests.JOB_CONFIG_FILE]
    assert json.loads(job_file) == trainer_job.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert TrainerJob.model_validate_json(job_file) == trainer_job
    # Active until the watch reports otherwise.
    assert jobs.observe(1) == {("fab-b", 2): JobObservation(JobState.ACTIVE)}


@pytest.mark.asyncio
async def test_starting_twice_creates_nothing_new(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    spec = spec_of(body)
    jobs = KubeJobs(kube, JobTable(), ref, spec, DEFAULTS)
    action = StartSiteJob(site="fab-a", round=0, attempt=0, mode="train")
    trainer_job = _trainer_job(spec, ref, action)
    await jobs.start(action, trainer_job)
    before = {key: kube.get(*key) for key in kube.objects}
    kube.forget_calls()

    await jobs.start(action, trainer_job)  # a restarted operator repeats the action

    name = manifests.job_name(ref, "fab-a", 0, 0)
    assert [(c.method, c.kind, c.name) for c in kube.calls] == [
        ("create", "Job", name),  # 409: None
        ("read", "Job", name),  # read back, so that the Secret could be made
        ("create", "Secret", name),  # 409: None
    ]
    assert {key: kube.get(*key) for key in kube.objects} == before


@pytest.mark.asyncio
async def test_restart_between_job_and_secret_makes_the_secret(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    spec = spec_of(body)
    action = StartSiteJob(site="fab-a", round=0, attempt=0, mode="evaluate")
    job_manifest = manifests.trainer_job(ref, spec, spec.site("fab-a"), 0, 0, "evaluate", DEFAULTS)
    existing = kube.put(job_manifest)  # the Job was made, then the operator restarted

    await KubeJobs(kube, JobTable(), ref, spec, DEFAULTS).start(action, _trainer_job(spec, ref, action))

    secret = kube.get("Secret", "site-a", job_manifest["metadata"]["name"])
    assert secret is not None
    assert secret["metadata"]["ownerReferences"][0]["uid"] == existing["metadata"]["uid"]


@pytest.mark.asyncio
async def test_stop_deletes_the_job_and_garbage_collection_its_secret(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    spec = spec_of(body)
    jobs = KubeJobs(kube, JobTable(), ref, spec, DEFAULTS)
    start = StartSiteJob(site="fab-c", round=3, attempt=1, mode="train")
    await jobs.start(start, _trainer_job(spec, ref, start))
    kube.forget_calls()

    await jobs.stop(StopSiteJob(site="fab-c", round=3, attempt=1, reason="suspended"))

    name = manifests.job_name(ref, "fab-c", 3, 1)
    # The Secret is owned by the Job: the operator needs no right to delete (or list) Secrets.
    assert kube.calls == [Call("delete", "Job", "site-c", name)]
    assert kube.objects == {}


# --------------------------------------------------------------------------------------------------
# provisioning


@pytest.mark.asyncio
async def test_token_is_created_once_and_read_back_by_a_new_provisioner(
    kube: RecordingKube, ref: TrainingRef, body: dict[str, Any]
) -> None:
    spec = spec_of(body)
    provisioner = Provisioner(kube, ref, DEFAULTS)
    token = await provisioner.token(None, spec)
    secret_name = manifests.token_secret_name(ref)
    assert len(token) >= 32
    assert [(c.method, c.kind, c.name) for c in kube.calls] == [
        ("secret_data", "Secret", secret_name),
        ("create", "Secret", secret_name),
    ]
    assert await kube.secret_data(ref.namespace, secret_name) == {manifests.TOKEN_KEY: token}
    secret = kube.get("Secret", ref.namespace, secret_name)
    assert secret is not None
    assert secret["metadata"]["ownerReferences"][0]["uid"] == ref.uid

    kube.forget_calls()
    assert await provisioner.token(token, spec) == token  # known: no call
    assert kube.calls == []
    assert await Provisioner(kube, ref, DEFAULTS).token(None, spec) == token  # a restarted operator
    assert kube.methods() == ["secret_data"]


@pytest.mark.asyncio
async def test_a_sealed_trainings_secret_holds_its_data_key_made_once(
    kube: RecordingKube, ref: TrainingRef, body: dict[str, Any]
) -> None:
    body["spec"]["privacy"] = {"encryptAtRest": True}
    spec = spec_of(body)
    await Provisioner(kube, ref, DEFAULTS).token(None, spec)
    values = await kube.secret_data(ref.namespace, manifests.token_secret_name(ref)) or {}
    key = DataKey.from_base64(values[manifests.DATA_KEY_KEY])
    credentials = KubeCredentials(kube, ref, spec, _no_stores)
    assert await credentials.data_key() == key
    # A restarted operator reads the same key; it never makes another.
    await Provisioner(kube, ref, DEFAULTS).token(None, spec)
    assert await KubeCredentials(kube, ref, spec, _no_stores).data_key() == key
    assert [c.method for c in kube.calls].count("create") == 1


async def _no_stores(storage: Any, access: str | None, secret: str | None) -> Any:
    raise AssertionError("no store is opened")


class SecretMadeMeanwhile(RecordingKube):
    """Another reconcile creates the token Secret between this one's read and its create."""

    def __init__(self, secret: dict[str, Any]) -> None:
        super().__init__()
        self.secret = secret

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        found = await super().secret_data(namespace, name)
        if found is None:
            self.put(self.secret)
        return found


@pytest.mark.asyncio
async def test_token_made_meanwhile_by_another_reconcile_is_used(ref: TrainingRef) -> None:
    kube = SecretMadeMeanwhile(manifests.token_secret(ref, "theirs"))
    assert await Provisioner(kube, ref, DEFAULTS).token(None, spec_of(training_body())) == "theirs"
    assert kube.methods() == ["secret_data", "create", "secret_data"]


@pytest.mark.asyncio
async def test_apply_makes_the_aggregator_objects_once_per_spec(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    provisioner = Provisioner(kube, ref, DEFAULTS)
    spec = spec_of(body)
    applied = await provisioner.apply(spec, None)
    name = manifests.aggregator_name(ref)
    assert [(c.method, c.kind, c.namespace, c.name) for c in kube.calls] == [
        ("apply", "ConfigMap", TRAINING_NAMESPACE, name),
        ("apply", "Deployment", TRAINING_NAMESPACE, name),
        ("apply", "Service", TRAINING_NAMESPACE, name),
    ]
    for kind in ("ConfigMap", "Deployment", "Service"):
        stored = kube.get(kind, TRAINING_NAMESPACE, name)
        assert stored is not None
        assert stored["metadata"]["labels"][manifests.TRAINING_UID] == ref.uid

    kube.forget_calls()
    assert await provisioner.apply(spec_of(training_body()), applied) == applied
    assert kube.calls == []

    changed = spec_of(training_body(training={"rounds": 5}))
    applied_again = await provisioner.apply(changed, applied)
    assert applied_again != applied
    assert [(c.method, c.kind) for c in kube.calls] == [
        ("apply", "ConfigMap"),
        ("apply", "Deployment"),
        ("apply", "Service"),
    ]
    config_map = kube.get("ConfigMap", TRAINING_NAMESPACE, name)
    assert config_map is not None
    training_file = config_map["data"][manifests.TRAINING_FILE]
    assert "rounds: 5" in training_file


@pytest.mark.asyncio
async def test_scale_patches_the_deployments_replicas(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    provisioner = Provisioner(kube, ref, DEFAULTS)
    await provisioner.apply(spec_of(body), None)
    kube.forget_calls()
    await provisioner.scale(0)
    name = manifests.aggregator_name(ref)
    assert kube.calls == [Call("patch", "Deployment", TRAINING_NAMESPACE, name, {"spec": {"replicas": 0}})]
    deployment = kube.get("Deployment", TRAINING_NAMESPACE, name)
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 0
    assert deployment["spec"]["template"]["spec"]["containers"]  # the rest of the spec is kept


# --------------------------------------------------------------------------------------------------
# credentials


class StoreCacheSpy:
    """The operator's store cache, counting what it was asked to open (boto3 needs no network here)."""

    def __init__(self) -> None:
        self.opened: list[tuple[StorageSpec, str | None, str | None]] = []

    async def __call__(self, storage: StorageSpec, access_key: str | None, secret_key: str | None) -> S3Store:
        self.opened.append((storage, access_key, secret_key))
        return S3Store.from_spec(storage, access_key, secret_key)


def credentials_secret(**values: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CREDENTIALS_SECRET, "namespace": TRAINING_NAMESPACE},
        "stringData": values,
    }


@pytest.mark.asyncio
async def test_keys_are_read_from_the_secret_once(kube: RecordingKube, ref: TrainingRef) -> None:
    # Created through the client, so the keys are stored as base64 data, as an API server keeps them.
    await kube.create(credentials_secret(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY))
    kube.forget_calls()
    body = training_body(model={"pretrained": {"source": "uri", "location": "s3://weights/base.safetensors"}})
    stores = StoreCacheSpy()
    credentials = KubeCredentials(kube, ref, spec_of(body), stores)
    store = await credentials.store()
    assert await credentials.signer() is store
    assert await credentials.pretrained_url(600) is not None
    assert await credentials.pretrained_url(600) is not None
    assert kube.calls == [Call("secret_data", "Secret", TRAINING_NAMESPACE, CREDENTIALS_SECRET)]
    assert credentials.keys == (ACCESS_KEY, SECRET_KEY)
    opened = [(storage.bucket, storage.endpoint, access, secret) for storage, access, secret in stores.opened]
    assert opened[0] == (BUCKET, ENDPOINT, ACCESS_KEY, SECRET_KEY)
    assert set(opened[1:]) == {("weights", ENDPOINT, ACCESS_KEY, SECRET_KEY)}


@pytest.mark.asyncio
async def test_a_missing_credentials_secret_is_a_temporary_error_naming_it(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    credentials = KubeCredentials(kube, ref, spec_of(body), StoreCacheSpy())
    with pytest.raises(TemporaryError) as raised:
        await credentials.store()
    message = str(raised.value)
    assert f"{TRAINING_NAMESPACE}/{CREDENTIALS_SECRET}" in message
    assert "spec.storage.credentialsSecret" in message
    # The user creates the Secret: the next try succeeds (the absence was not remembered).
    kube.put(credentials_secret(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY))
    await credentials.store()
    assert credentials.keys == (ACCESS_KEY, SECRET_KEY)


@pytest.mark.asyncio
async def test_without_a_credentials_secret_the_operators_own_identity_is_used(
    kube: RecordingKube, ref: TrainingRef
) -> None:
    body = training_body(storage={"credentialsSecret": None})
    stores = StoreCacheSpy()
    await KubeCredentials(kube, ref, spec_of(body), stores).store()
    assert kube.calls == []
    assert [(access, secret) for _, access, secret in stores.opened] == [(None, None)]


@pytest.mark.asyncio
async def test_pretrained_uri_is_presigned_for_its_bucket_and_key_at_the_trainings_endpoint(
    kube: RecordingKube, ref: TrainingRef
) -> None:
    kube.put(credentials_secret(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY))
    body = training_body(model={"pretrained": {"source": "uri", "location": "s3://weights/base.safetensors"}})
    stores = StoreCacheSpy()
    url = await KubeCredentials(kube, ref, spec_of(body), stores).pretrained_url(900)
    assert url is not None
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}" == ENDPOINT
    assert parts.path == "/weights/base.safetensors"
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-Credential"][0].startswith(f"{ACCESS_KEY}/")
    assert "X-Amz-Signature" in query
    [(storage, _, _)] = stores.opened
    assert (storage.bucket, storage.prefix, storage.endpoint) == ("weights", "", ENDPOINT)


@pytest.mark.asyncio
@pytest.mark.parametrize("pretrained", [{"source": "hub"}, {"source": "none"}])
async def test_pretrained_url_is_none_for_other_sources(
    kube: RecordingKube, ref: TrainingRef, pretrained: dict[str, str]
) -> None:
    stores = StoreCacheSpy()
    credentials = KubeCredentials(kube, ref, spec_of(training_body(model={"pretrained": pretrained})), stores)
    assert await credentials.pretrained_url(900) is None
    assert stores.opened == []
    assert kube.calls == []


# --------------------------------------------------------------------------------------------------
# status writer


def _stored_status(kube: RecordingKube) -> dict[str, Any]:
    training = kube.get("FederatedTraining", TRAINING_NAMESPACE, "wafer")
    assert training is not None
    status: dict[str, Any] = training["status"]
    return status


@pytest.mark.asyncio
async def test_status_after_a_restart_comes_from_the_body(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    body["status"] = {"phase": "Running", "round": 3, "siteStates": {"fab-a": {"round": 2, "attempt": 1}}}
    writer = StatusWriter(kube, ref)
    status = writer.current(body)
    assert (status.phase, status.round) == (Phase.RUNNING, 3)
    assert status.site_states == {"fab-a": AttemptRef(round=2, attempt=1)}
    # From now on this operator's own last write counts, not a (possibly stale) body.
    assert writer.current({**body, "status": {"round": 1}}) is status


def test_an_unreadable_status_starts_afresh(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef, caplog: pytest.LogCaptureFixture
) -> None:
    body["status"] = {"phase": "Exploding", "round": "many"}
    status = StatusWriter(kube, ref).current(body)
    assert status == FederatedTrainingStatus()
    assert "unreadable status" in caplog.text


@pytest.mark.asyncio
async def test_each_write_sends_only_what_changed(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    body["status"] = {"phase": "Running", "round": 3, "message": "round 3: training"}
    kube.put(body)
    writer = StatusWriter(kube, ref)
    status = writer.current(body)

    status.round = 4
    assert await writer.write(status, generation=2) is True
    [first] = kube.calls_of("patch_status")
    assert first.body["round"] == 4
    assert first.body["observedGeneration"] == 2
    assert "phase" not in first.body  # unchanged
    assert "message" not in first.body
    assert _stored_status(kube) == status.to_api()

    kube.forget_calls()
    status.round = 5
    status.message = None
    assert await writer.write(status, generation=2) is True
    assert kube.calls == [
        Call("patch_status", "FederatedTraining", TRAINING_NAMESPACE, "wafer", {"round": 5, "message": None})
    ]
    assert "message" not in _stored_status(kube)
    assert _stored_status(kube) == status.to_api()

    kube.forget_calls()
    assert await writer.write(status, generation=2) is True  # nothing changed: no call
    assert kube.calls == []


@pytest.mark.asyncio
async def test_writing_the_status_of_a_gone_training_returns_false(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    writer = StatusWriter(kube, ref)
    status = writer.current(body)
    status.round = 1
    assert await writer.write(status, generation=1) is False
    assert len(kube.calls_of("patch_status")) == 1
    assert writer.written == {}  # not recorded as written: the next write sends it again


# --------------------------------------------------------------------------------------------------
# the driver core


def test_a_training_attempt_reads_the_committed_state_and_writes_its_own(body: dict[str, Any]) -> None:
    spec = spec_of(body)
    layout = TrainingLayout(TRAINING_NAMESPACE, "wafer")
    signer = FakeSigner()
    committed = AttemptRef(round=1, attempt=2)
    action = StartSiteJob(site="fab-a", round=2, attempt=1, mode="train", state_from=committed)
    job = build_trainer_job(spec, layout, action, signer, 700, "https://weights.example/base")
    assert job.state_get_url == signer.presign_get(layout.site_state("fab-a", 1, 2), 700)
    assert job.state_put_url == signer.presign_put(layout.site_state("fab-a", 2, 1), 700)
    assert job.global_model_url == signer.presign_get(layout.global_model(2), 700)
    assert job.update_url == signer.presign_put(layout.update(2, "fab-a"), 700)
    assert job.pretrained_url == "https://weights.example/base"
    assert (job.training, job.site, job.round, job.attempt, job.mode) == ("wafer", "fab-a", 2, 1, "train")

    fresh = build_trainer_job(spec, layout, StartSiteJob("fab-a", 0, 0, "train"), signer, 700, None)
    assert fresh.state_get_url is None
    assert fresh.state_put_url == signer.presign_put(layout.site_state("fab-a", 0, 0), 700)


def test_an_evaluation_attempt_gets_no_state_urls(body: dict[str, Any]) -> None:
    layout = TrainingLayout(TRAINING_NAMESPACE, "wafer")
    action = StartSiteJob("fab-b", 4, 0, "evaluate", state_from=AttemptRef(round=3, attempt=0))
    job = build_trainer_job(spec_of(body), layout, action, FakeSigner(), 700, None)
    assert (job.state_get_url, job.state_put_url) == (None, None)
    assert job.mode == "evaluate"


def test_an_evaluation_reads_the_committed_state_where_the_site_keeps_personal_tensors(
    body: dict[str, Any],
) -> None:
    body["spec"]["exchange"] = {"policy": "exclude", "layers": ["head.*"]}
    layout = TrainingLayout(TRAINING_NAMESPACE, "wafer")
    signer = FakeSigner()
    action = StartSiteJob("fab-b", 4, 0, "evaluate", state_from=AttemptRef(round=3, attempt=0))
    job = build_trainer_job(spec_of(body), layout, action, signer, 700, None)
    assert job.state_get_url == signer.presign_get(layout.site_state("fab-b", 3, 0), 700)
    assert job.state_put_url is None, "an evaluation never writes a site's state"
    assert job.spec.exchange.layers == ["head.*"]


def test_an_evaluation_gets_a_url_for_the_site_s_own_model_only_where_the_spec_publishes_it(
    body: dict[str, Any],
) -> None:
    layout = TrainingLayout(TRAINING_NAMESPACE, "wafer")
    signer = FakeSigner()
    evaluation = StartSiteJob("fab-b", 4, 0, "evaluate", state_from=AttemptRef(round=3, attempt=0))
    training = StartSiteJob("fab-b", 3, 0, "train", state_from=AttemptRef(round=2, attempt=0))
    own_model = signer.presign_put(layout.site_merged_model("fab-b"), 700)
    assert own_model.endswith("wafer/sites/fab-b/model-merged.safetensors?expires=700")

    body["spec"]["exchange"] = {"policy": "exclude", "layers": ["head.*"]}
    kept = spec_of(body)  # personal layers stay at the sites by default
    assert build_trainer_job(kept, layout, evaluation, signer, 700, None).site_model_url is None

    body["spec"]["exchange"]["siteModels"] = True
    published = spec_of(body)
    assert build_trainer_job(published, layout, evaluation, signer, 700, None).site_model_url == own_model
    assert build_trainer_job(published, layout, training, signer, 700, None).site_model_url is None

    del body["spec"]["exchange"]
    body["spec"]["mode"] = "localOnly"
    alone = build_trainer_job(spec_of(body), layout, evaluation, signer, 700, None)
    assert alone.site_model_url == own_model
    assert alone.state_get_url == signer.presign_get(layout.site_state("fab-b", 3, 0), 700)
    assert alone.spec.mode.value == "localOnly"


def test_a_training_job_gets_the_server_control_variate_only_under_scaffold(body: dict[str, Any]) -> None:
    layout = TrainingLayout(TRAINING_NAMESPACE, "wafer")
    signer = FakeSigner()
    training = StartSiteJob("fab-b", 3, 0, "train", state_from=AttemptRef(round=2, attempt=0))
    evaluation = StartSiteJob("fab-b", 4, 0, "evaluate", state_from=AttemptRef(round=3, attempt=0))
    assert build_trainer_job(spec_of(body), layout, training, signer, 700, None).control_url is None
    body["spec"]["aggregation"] = {**body["spec"].get("aggregation", {}), "controlVariates": "scaffold"}
    scaffold = spec_of(body)
    job = build_trainer_job(scaffold, layout, training, signer, 700, None)
    assert job.control_url == signer.presign_get(layout.server_control(3), 700)
    assert job.control_url.endswith("wafer/rounds/00003/control.safetensors?expires=700")
    assert build_trainer_job(scaffold, layout, evaluation, signer, 700, None).control_url is None


def test_url_expiry_is_the_round_timeout_plus_grace_capped_at_seven_days() -> None:
    short = spec_of(training_body(aggregation={"roundTimeoutSeconds": 300}))
    assert url_expiry_seconds(short, 60) == 360
    longest = spec_of(training_body(aggregation={"roundTimeoutSeconds": 518400}))
    assert url_expiry_seconds(longest, 3 * 86400) == MAX_PRESIGN_SECONDS == 7 * 24 * 3600


def test_round_memory_forgets_verdicts_on_a_new_round() -> None:
    memory = RoundMemory()
    status = FederatedTrainingStatus(round=2)
    memory.observations(status, {})
    verdict = UpdateVerdict(round=2, site="fab-a", accepted=True, samples=40)
    memory.verdicts["fab-a"] = verdict
    jobs = {("fab-a", 0): JobObservation(JobState.SUCCEEDED)}
    same_round = memory.observations(status, jobs)
    assert same_round.verdicts == {"fab-a": verdict}
    assert same_round.jobs == jobs
    next_round = memory.observations(FederatedTrainingStatus(round=3), {})
    assert next_round.verdicts == {}
    assert memory.verdicts == {}


# --------------------------------------------------------------------------------------------------
# history


def _record(round_index: int, participants: list[str], kind: str = "train") -> RoundRecord:
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    return RoundRecord.model_validate(
        {
            "round": round_index,
            "kind": kind,
            "startedAt": moment,
            "closedAt": moment,
            "participants": participants,
        }
    )


@pytest.mark.asyncio
async def test_history_replaces_a_repeated_round_and_keeps_the_others(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    key = TrainingLayout(TRAINING_NAMESPACE, "wafer").history()
    append_record(store, key, _record(0, ["fab-a"]))
    append_record(store, key, _record(1, ["fab-a"]))
    append_record(store, key, _record(1, ["fab-a", "fab-b"]))  # a driver repeated the step

    async def open_store() -> LocalStore:
        return store

    await StoreHistory(open_store, key).record(
        _record(1, ["fab-b"], kind="evaluate"), FederatedTrainingStatus()
    )
    lines = [json.loads(line) for line in store.get_bytes(key).decode().splitlines()]
    assert [(line["round"], line["kind"], line["participants"]) for line in lines] == [
        (0, "train", ["fab-a"]),
        (1, "train", ["fab-a", "fab-b"]),
        (1, "evaluate", ["fab-b"]),
    ]


# --------------------------------------------------------------------------------------------------
# cleanup


def test_cleanup_targets_every_site_namespace_and_the_trainings(ref: TrainingRef) -> None:
    spec = {
        "sites": [{"name": "a", "namespace": "site-a"}, {"name": "b"}, {"name": "c", "namespace": "site-a"}]
    }
    targets = cleanup_targets(ref, spec)
    for namespace in ("site-a", "default", TRAINING_NAMESPACE):
        assert ("Job", namespace) in targets
    for kind in ("Deployment", "Service", "ConfigMap"):
        assert (kind, TRAINING_NAMESPACE) in targets
        assert (kind, "site-a") not in targets
    # Secrets are never listed: garbage collection removes them with their owner.
    assert not [target for target in targets if target[0] == "Secret"]
    assert len(targets) == len(set(targets)) == 3 + 3
    # A spec that no longer validates still names the training's own namespace.
    assert set(cleanup_targets(ref, {"sites": None})) >= {
        ("Job", TRAINING_NAMESPACE),
        ("Deployment", TRAINING_NAMESPACE),
    }


def _labelled(
    kind: str, namespace: str, name: str, uid: str | None, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    labels = {manifests.TRAINING_UID: uid} if uid else {}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [{"uid": owner["metadata"]["uid"]}]
    return {"kind": kind, "metadata": metadata}


@pytest.mark.asyncio
async def test_remove_training_objects_deletes_only_ours_and_skips_a_forbidden_namespace(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    job = kube.put(_labelled("Job", "site-a", "j-a", ref.uid))
    ours = [
        _labelled("Deployment", TRAINING_NAMESPACE, "agg", ref.uid),
        _labelled("ConfigMap", TRAINING_NAMESPACE, "agg", ref.uid),
    ]
    # Owned by the Job: removed with it by garbage collection, never listed or deleted by the operator.
    kube.put(_labelled("Secret", "site-a", "j-a", ref.uid, owner=job))
    kept = [
        _labelled("Job", "site-a", "other-training", "another-uid"),
        _labelled("Secret", "site-a", "unlabelled", None),
        _labelled("Job", "site-b", "j-b", ref.uid),  # in a namespace the operator may not read
        _labelled("Job", "elsewhere", "j-x", ref.uid),  # not a namespace of this training
    ]
    for item in ours + kept:
        kube.put(item)
    kube.forbid("Job", "site-b")

    removed = await remove_training_objects(kube, ref, body["spec"])

    assert removed == len(ours) + 1  # and the Job
    remaining = {(kind, namespace, name) for kind, namespace, name in kube.objects}
    assert remaining == {(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in kept}
    assert ("list", "Job", "site-b") in [(c.method, c.kind, c.namespace) for c in kube.calls]
    assert all(c.body == {manifests.TRAINING_UID: ref.uid} for c in kube.calls_of("list"))
    assert not [call for call in kube.calls if call.kind == "Secret"]


@pytest.mark.asyncio
async def test_remove_training_objects_raises_other_api_errors(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    kube.forbid("Job", "site-a", status=500)
    with pytest.raises(KubeError) as raised:
        await remove_training_objects(kube, ref, body["spec"])
    assert raised.value.status == 500


# --------------------------------------------------------------------------------------------------
# validate_spec


def test_validate_spec_accepts_a_cluster_spec(body: dict[str, Any]) -> None:
    spec = validate_spec(body)
    assert isinstance(spec, FederatedTrainingSpec)
    assert spec.storage is not None
    assert spec.storage.bucket == BUCKET


def test_validate_spec_refuses_a_spec_without_storage(body: dict[str, Any]) -> None:
    del body["spec"]["storage"]
    problem = validate_spec(body)
    assert isinstance(problem, str)
    assert "spec.storage" in problem
    assert "set storage.bucket" in problem


def test_validate_spec_refuses_pretrained_weights_from_a_file() -> None:
    body = training_body(model={"pretrained": {"source": "file", "location": "/weights/base.safetensors"}})
    problem = validate_spec(body)
    assert isinstance(problem, str)
    assert "spec.model.pretrained.source" in problem
    assert "use source: uri" in problem


def test_validate_spec_names_both_problems_at_once(body: dict[str, Any]) -> None:
    del body["spec"]["storage"]
    body["spec"]["model"]["pretrained"] = {"source": "file", "location": "/weights/base.safetensors"}
    problem = validate_spec(body)
    assert isinstance(problem, str)
    assert problem.count("; ") == 1


def test_validate_spec_names_schema_errors_by_their_full_path(body: dict[str, Any]) -> None:
    body["spec"]["training"]["localSteps"] = 0
    problem = validate_spec(body)
    assert isinstance(problem, str)
    assert problem.startswith("spec.training.localSteps")


@pytest.mark.asyncio
async def test_a_keys_secret_without_the_aws_key_names_is_a_wait_naming_them() -> None:
    kube = RecordingKube()
    body = training_body()
    ref = training_ref(body)
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": ref.namespace},
            "stringData": {"accessKey": "a", "secretKey": "b"},
        }
    )
    stores = StoreCacheSpy()
    with pytest.raises(TemporaryError, match="has no AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY"):
        await KubeCredentials(kube, ref, spec_of(body), stores).signer()
    assert stores.opened == []


# --------------------------------------------------------------------------------------------------
# a whole reconcile, when the aggregator's objects cannot be made


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["Deployment", "ConfigMap", "Service", "Secret"])
@pytest.mark.parametrize(
    ("status_code", "phase", "condition", "reason"),
    [
        (422, "Failed", "Failed", "KubernetesRejected"),  # refused as invalid: no retry can help
        (503, "Running", "Waiting", "Waiting"),  # the API server away: waited for, bounded
        (403, "Running", "Waiting", "Forbidden"),  # RBAC lacks it: waited for (bounded), named
    ],
)
async def test_a_reconcile_that_cannot_provision_the_aggregator_fails_or_waits(
    body: dict[str, Any], kind: str, status_code: int, phase: str, condition: str, reason: str
) -> None:
    kube = RecordingKube()
    kube.put({**body, "status": {}})
    kube.forbid(kind, TRAINING_NAMESPACE, status=status_code)
    settings = OperatorSettings(liveness_port=None, metrics_port=None)
    async with aiohttp.ClientSession() as session:
        context = Context(
            settings=settings, kube=kube, session=session, metrics=OperatorMetrics(CollectorRegistry())
        )
        outcome = await Reconciler(context, body).reconcile()
    status = kube.get(KIND, TRAINING_NAMESPACE, body["metadata"]["name"])["status"]
    assert status["phase"] == phase
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions[condition]["status"] == "True"
    assert conditions[condition]["reason"] == reason
    assert f"HTTP {status_code}" in conditions[condition]["message"]
    assert kind in conditions[condition]["message"]
    assert TRAINING_NAMESPACE in conditions[condition]["message"]
    if status_code == 403:
        assert "RBAC" in conditions[condition]["message"]
    # Looked at again as soon as the shortest wait of the pass asks (the aggregator's, not up here).
    assert outcome.delay == (None if phase == "Failed" else pytest.approx(2.0))


@pytest.mark.asyncio
async def test_a_training_failed_for_its_spec_stays_invalid_on_later_reconciles(body: dict[str, Any]) -> None:
    """The aggregator found the spec does not fit the model: the checks here pass it, but a later
    reconcile (a Job event, an operator restart) must not call the spec valid again."""
    message = "spec.exchange.layers[0]: 'foo.*' matches no trainable tensor"
    since = NOW.isoformat()
    conditions = [
        {
            "type": kind,
            "status": "True",
            "reason": "InvalidSpec",
            "message": message,
            "lastTransitionTime": since,
        }
        for kind in ("Failed", "Invalid")
    ]
    kube = RecordingKube()
    failed = {**body, "status": {"phase": "Failed", "message": message, "conditions": conditions}}
    kube.put(failed)
    settings = OperatorSettings(liveness_port=None, metrics_port=None)
    async with aiohttp.ClientSession() as session:
        context = Context(
            settings=settings, kube=kube, session=session, metrics=OperatorMetrics(CollectorRegistry())
        )
        outcome = await Reconciler(context, failed).reconcile()
    status = kube.get(KIND, TRAINING_NAMESPACE, body["metadata"]["name"])["status"]
    invalid = {c["type"]: c for c in status["conditions"]}["Invalid"]
    assert (invalid["status"], invalid["reason"], invalid["message"]) == ("True", "InvalidSpec", message)
    assert "SpecValid" not in [event.reason for event in outcome.events]
    assert outcome.delay is None


# --------------------------------------------------------------------------------------------------
# trainer Jobs and their Secrets the API server refuses or the operator's RBAC forbids


class FakeCredentials:
    async def signer(self) -> FakeSigner:
        return FakeSigner()

    async def pretrained_url(self, expires_seconds: int) -> str | None:
        return None

    async def data_key(self) -> None:
        return None


class NoAggregator:
    """An aggregator port no test here reaches."""

    async def initialize(self) -> str:
        raise AssertionError("not called")

    async def submit(self, round_index: int, site: str) -> UpdateVerdict:
        raise AssertionError("not called")

    async def close(self, round_index: int, participants: list[str], rejected: list[Any]) -> Any:
        raise AssertionError("not called")

    async def merge(self, round_index: int, best_round: int | None) -> Any:
        raise AssertionError("not called")

    async def apply_retention(self, round_index: int, updates: bool, models: list[int]) -> int:
        raise AssertionError("not called")

    async def release(self) -> None:
        return None


class NoHistory:
    async def record(self, record: RoundRecord, status: FederatedTrainingStatus) -> None:
        return None


def _core(kube: RecordingKube, body: dict[str, Any], ref: TrainingRef) -> DriverCore:
    spec = spec_of(body)
    return DriverCore(
        spec,
        TrainingLayout(ref.namespace, ref.name),
        jobs=KubeJobs(kube, JobTable(), ref, spec, DEFAULTS),
        aggregator=NoAggregator(),
        credentials=FakeCredentials(),
        history=NoHistory(),
        url_grace_seconds=600,
    )


INVALID_JOB = (
    'Job.batch "wafer-fab-b-r0-a0" is invalid: spec.template.spec.containers[0].resources.limits: '
    'Invalid value: "-1": must be greater than or equal to 0'
)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["Job", "Secret"])
async def test_a_trainer_object_refused_as_invalid_fails_the_training_naming_the_field(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef, kind: str
) -> None:
    kube.forbid(kind, "site-b", status=422, message=INVALID_JOB)
    core = _core(kube, body, ref)
    start = StartSiteJob(site="fab-b", round=0, attempt=0, mode="train")
    status = FederatedTrainingStatus()
    await core.act(status, [start])
    failure = core.memory.failure
    assert failure is not None
    assert failure.reason == "KubernetesRejected"
    assert f"create {kind} in site-b" in failure.message
    assert "spec.template.spec.containers[0].resources.limits" in failure.message
    decision = step(spec_of(body), status, core.memory.observations(status, {}), NOW)
    assert decision.status.phase is Phase.FAILED
    failed = next(c for c in decision.status.conditions if c.type.value == "Failed")
    assert failed.reason == "KubernetesRejected"
    assert "resources.limits" in failed.message


@pytest.mark.asyncio
async def test_a_job_create_the_rbac_forbids_is_a_wait_that_ends_failed_naming_it(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    kube.forbid(
        "Job",
        "site-b",
        status=403,
        message='jobs.batch is forbidden: User "system:serviceaccount:fedtrain:fedtrain-operator" cannot '
        'create resource "jobs" in API group "batch" in the namespace "site-b"',
    )
    spec = spec_of(body).model_copy(deep=True)
    spec.aggregation.wait_timeout_seconds = 30
    core = _core(kube, body, ref)
    start = StartSiteJob(site="fab-b", round=0, attempt=0, mode="train")
    status = FederatedTrainingStatus()
    await core.act(status, [start])
    assert core.memory.waiting_reason == "Forbidden"
    waiting_for = core.memory.waiting_for or ""
    assert "create Job in site-b" in waiting_for
    assert "siteNamespaces" in waiting_for
    # The engine shows the wait, then fails the training with it once it outlasts its bound.
    status = step(spec, status, core.memory.observations(status, {}), NOW).status
    waiting = next(c for c in status.conditions if c.type.value == "Waiting")
    assert (waiting.status, waiting.reason) == ("True", "Forbidden")
    later = NOW + timedelta(seconds=30)
    decision = step(spec, status, core.memory.observations(status, {}), later)
    assert decision.status.phase is Phase.FAILED
    failed = next(c for c in decision.status.conditions if c.type.value == "Failed")
    assert failed.reason == "Forbidden"
    assert 'in the namespace "site-b"' in failed.message
    assert "waitTimeoutSeconds is 30" in failed.message


@pytest.mark.asyncio
async def test_an_unexpected_error_in_an_action_fails_the_training_once_naming_it(
    kube: RecordingKube, body: dict[str, Any], ref: TrainingRef
) -> None:
    core = _core(kube, body, ref)

    async def broken_start(action: StartSiteJob, job: TrainerJob) -> None:
        raise ValueError("a bug")

    core.jobs.start = broken_start  # type: ignore[method-assign]
    await core.act(FederatedTrainingStatus(), [StartSiteJob(site="fab-a", round=0, attempt=0, mode="train")])
    failure = core.memory.failure
    assert failure is not None
    assert failure.reason == "OperatorError"
    assert "StartSiteJob failed with an unexpected ValueError: a bug" in failure.message


# --------------------------------------------------------------------------------------------------
# namespaces the operator does not serve


def test_a_site_in_a_namespace_the_operator_does_not_serve_is_named_with_the_chart_value() -> None:
    spec = spec_of(training_body())  # sites in site-a, site-b, site-c
    assert unserved_site_namespaces(spec, []) is None  # cluster-wide: every namespace
    assert unserved_site_namespaces(spec, [TRAINING_NAMESPACE, "site-*"]) is None
    problem = unserved_site_namespaces(spec, [TRAINING_NAMESPACE, "site-a", "site-b"])
    assert problem is not None
    assert "spec.sites[2].namespace: 'site-c' (site fab-c)" in problem
    assert "site-a" not in problem.split("serves")[0]
    assert "siteNamespaces" in problem
    assert unserved_site_namespaces(spec, ["site-*", "!site-b"]) is not None


# --------------------------------------------------------------------------------------------------
# why the aggregator does not answer


def _pod(name: str, container: dict[str, Any], ready: bool = False, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": str(ready)}],
            "containerStatuses": [container],
            **status,
        },
    }


@pytest.mark.parametrize(
    ("container", "expected"),
    [
        (
            {
                "state": {
                    "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}
                }
            },
            'CreateContainerConfigError: secret "s3" not found',
        ),
        (
            {
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"reason": "Error", "exitCode": 3, "message": "no bucket"}},
            },
            "CrashLoopBackOff: back-off 40s (restarted 4 times; last ended Error (exit code 3): no bucket)",
        ),
        (
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}},
            'ImagePullBackOff: Back-off pulling image "x"',
        ),
        ({"state": {"waiting": {"reason": "ContainerCreating"}}}, "ContainerCreating"),
        ({"state": {"running": {}}}, None),
    ],
)
def test_pod_problem_reads_what_kubectl_describe_shows(
    container: dict[str, Any], expected: str | None
) -> None:
    assert pod_problem(_pod("agg-1", container)) == expected


def test_an_unscheduled_pod_says_why() -> None:
    pod = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
            ],
        }
    }
    assert pod_problem(pod) == "Unschedulable: 0/3 nodes"


@pytest.mark.asyncio
async def test_why_unavailable_names_each_pod_and_asks_a_running_one_its_readiness(
    kube: RecordingKube, ref: TrainingRef
) -> None:
    provisioner = Provisioner(kube, ref, DEFAULTS)
    assert "has no pod" in (await provisioner.why_unavailable() or "")
    labels = manifests.aggregator_selector(ref)
    for name, container in (
        ("agg-old", {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
        ("agg-new", {"state": {"running": {}}}),
    ):
        pod = _pod(name, container)
        pod["kind"] = "Pod"
        pod["metadata"].update(namespace=ref.namespace, labels=labels)
        kube.put(pod)
    asked: list[tuple[str, str]] = []

    async def readiness(pod: str, ip: str) -> str | None:
        asked.append((pod, ip))
        return "running, not ready: NoSuchBucket"

    cause = await provisioner.why_unavailable(readiness)
    assert cause == "pod agg-new: running, not ready: NoSuchBucket; pod agg-old: CrashLoopBackOff"
    assert asked == [("agg-new", "10.0.0.7")]
    kube.forbid("Pod", ref.namespace)
    assert "could not be read" in (await provisioner.why_unavailable(readiness) or "")


# --------------------------------------------------------------------------------------------------
# a reconcile that raises what no code classified


@pytest.mark.asyncio
async def test_an_unexpected_reconcile_error_is_shown_in_the_status_and_logged_once(
    body: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    kube = RecordingKube()
    kube.put({**body, "status": {}})
    settings = OperatorSettings(liveness_port=None, metrics_port=None)
    async with aiohttp.ClientSession() as session:
        context = Context(
            settings=settings, kube=kube, session=session, metrics=OperatorMetrics(CollectorRegistry())
        )
        error = ValueError("a bug")
        await Reconciler(context, body).report_unexpected(error)
        runtime = context.runtime(training_ref(body))
        with caplog.at_level(logging.WARNING, logger="fedtrain.operator.handlers"):
            delays = [failed_reconcile(context, runtime, error, logging.ERROR) for _ in range(4)]
    status = kube.get(KIND, TRAINING_NAMESPACE, body["metadata"]["name"])["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "OperatorError")
    assert "unexpected ValueError: a bug" in ready["message"]
    assert len(caplog.records) == 1, "the same error is logged once"
    assert caplog.records[0].exc_info is not None
    assert delays == [5.0, 10.0, 20.0, 40.0]
