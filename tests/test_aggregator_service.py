"""The aggregator's HTTP API: auth, error shapes, the round flow over moto S3, restarts, the schema, the CLI.

Apps are built by `create_app` around a RoundAggregator on a moto bucket, with a tiny real model, so
every call goes through the same library code and S3 requests as the service in a pod.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.service import create_app
from fedtrain.aggregator.settings import (
    SettingsError,
    layout_of,
    load_settings,
    pretrained_weights,
    store_of,
)
from fedtrain.api import FederatedTraining, FederatedTrainingSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode, read_metadata
from fedtrain.layout import TrainingLayout
from fedtrain.messages import ErrorReply, ModelReply, RoundManifest, RoundReply, UpdateVerdict
from fedtrain.store import LocalStore, ObjectStore, S3Store, StoreError

LAYOUT = TrainingLayout(namespace="lab", name="wafers")
TOKEN = "s3cr3t-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SITES = ("fab-a", "fab-b", "fab-c")
SAMPLES = {"fab-a": 120, "fab-b": 45, "fab-c": 300}
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": 9,
    "imageSize": 28,
    "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
}
SPEC_DOCUMENT: dict[str, Any] = {
    "model": MODEL,
    "lora": {"rank": 4},
    "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SITES],
}
SPEC = FederatedTrainingSpec.model_validate(SPEC_DOCUMENT)

#: Every /v1 endpoint, with a body it would accept.
V1_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/initialize", None),
    ("POST", "/v1/rounds/0/updates", {"site": "fab-a"}),
    ("POST", "/v1/rounds/0/close", {"participants": ["fab-a"]}),
    ("GET", "/v1/rounds/0", None),
    ("POST", "/v1/merge", {"round": 0}),
]


def _app(store: ObjectStore, **options: Any) -> FastAPI:
    return create_app(RoundAggregator(store, LAYOUT, SPEC), TOKEN, **options)


@pytest.fixture
def app(s3_store: S3Store) -> FastAPI:
    return _app(s3_store)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as authorized:
        yield authorized


@pytest.fixture
def anonymous(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as unauthorized:
        yield unauthorized


def _error(response: Any, status: int, code: str) -> str:
    """The message of an error reply, after checking its status, shape and code."""
    assert response.status_code == status, response.text
    reply = ErrorReply.model_validate(response.json())
    assert reply.error.code == code, reply
    return reply.error.message


def _deltas(store: ObjectStore) -> dict[str, dict[str, torch.Tensor]]:
    """Small random deltas of the round-0 global model's tensors, one per site."""
    initial = decode(store.get_bytes(LAYOUT.global_model(0)))
    deltas = {}
    for index, site in enumerate(SITES):
        generator = torch.Generator().manual_seed(index + 1)
        deltas[site] = {
            name: 0.01 * torch.randn(tuple(tensor.shape), generator=generator)
            for name, tensor in initial.tensors.items()
        }
    return deltas


def _write_update(store: ObjectStore, site: str, delta: Mapping[str, torch.Tensor], samples: int) -> bytes:
    """An update as a trainer uploads it: the delta and its metadata at the layout's key."""
    fingerprint = read_metadata(store.get_bytes(LAYOUT.global_model(0))).base_fingerprint
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=0,
        site=site,
        samples=samples,
        base_fingerprint=fingerprint,
        timings={"train_seconds": 2.0},
    )
    data = encode(delta, meta)
    store.put_bytes(LAYOUT.update(0, site), data)
    return data


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    found = [
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# --------------------------------------------------------------------------------------------------
# probes and metrics need no token


def test_probes_and_metrics_need_no_token(anonymous: TestClient) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    metrics = anonymous.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    labels = {"namespace": "lab", "training": "wafers"}
    assert _sample(metrics.text, "fedtrain_aggregator_round", **labels) == -1
    assert (
        _sample(metrics.text, "fedtrain_aggregator_requests_total", endpoint="/readyz", code="200", **labels)
        == 1
    )


def test_readyz_is_503_when_the_store_is_unreachable(s3_endpoint: str) -> None:
    # s3_endpoint only for its fake AWS keys: without keys botocore would first ask the EC2 metadata.
    closed_port = free_port()
    unreachable = S3Store(bucket="nowhere", endpoint=f"http://127.0.0.1:{closed_port}")
    with TestClient(_app(unreachable, readiness_timeout_seconds=0.5)) as client:
        started = time.monotonic()
        message = _error(client.get("/readyz"), 503, "store-unavailable")
        # botocore keeps retrying a refused connection; the probe answers within its timeout anyway.
        assert time.monotonic() - started < 5
        assert "object store" in message or "Connect" in message
        assert client.get("/healthz").status_code == 200  # alive, only not ready


def test_readyz_reports_the_probe_error_and_caches_the_answer(s3_store: S3Store) -> None:
    calls: list[float] = []

    def probe() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise StoreError("GET s3://bucket failed: HTTP 403 AccessDenied")

    with TestClient(_app(s3_store, readiness_probe=probe, readiness_ttl_seconds=0.2)) as client:
        message = _error(client.get("/readyz"), 503, "store-unavailable")
        assert "AccessDenied" in message
        _error(client.get("/readyz"), 503, "store-unavailable")
        assert len(calls) == 1  # the second answer came from the cache
        time.sleep(0.25)
        assert client.get("/readyz").json() == {"status": "ready"}
        assert len(calls) == 2


def test_readyz_is_503_when_the_bucket_is_missing(s3_endpoint: str) -> None:
    missing = S3Store(bucket=f"missing-{uuid.uuid4().hex[:12]}", endpoint=s3_endpoint)
    with TestClient(_app(missing)) as client:
        assert "NoSuchBucket" in _error(client.get("/readyz"), 503, "store-unavailable")


# --------------------------------------------------------------------------------------------------
# every /v1 endpoint needs the token


@pytest.mark.parametrize(("method", "path", "body"), V1_CALLS, ids=[call[1] for call in V1_CALLS])
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic czNjcjN0",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Token {TOKEN}",
        "Bearer s3cr3t-tökén",
    ],
    ids=["missing", "empty", "basic", "no-token", "blank-token", "wrong", "other-scheme", "non-ascii"],
)
def test_v1_rejects_a_missing_or_wrong_token(
    anonymous: TestClient,
    s3_store: S3Store,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    authorization: str | None,
) -> None:
    s3_store.put_bytes("marker", b"present before")
    before = s3_store.list()
    headers = {} if authorization is None else {"Authorization": authorization.encode()}
    response = anonymous.request(method, path, json=body, headers=headers)  # type: ignore[arg-type]
    message = _error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in message or "token" in message
    assert s3_store.list() == before


def test_a_malformed_body_without_a_token_is_still_401(anonymous: TestClient) -> None:
    response = anonymous.post(
        "/v1/rounds/0/updates", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    _error(response, 401, "unauthorized")


def test_the_bearer_scheme_is_case_insensitive(anonymous: TestClient, s3_store: S3Store) -> None:
    response = anonymous.post("/v1/initialize", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert s3_store.exists(LAYOUT.global_model(0))


# --------------------------------------------------------------------------------------------------
# malformed requests are 422 naming the field, and change nothing


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/rounds/0/updates", b"{not json", "body"),
        ("/v1/rounds/0/updates", b"", "body"),
        ("/v1/rounds/0/updates", b'"fab-a"', "body"),
        ("/v1/rounds/0/updates", {"site": 5}, "site"),
        ("/v1/rounds/0/updates", {}, "site"),
        ("/v1/rounds/0/updates", {"site": "fab-a", "attempt": 2}, "attempt"),
        ("/v1/rounds/0/updates", {"site": "../fab-a"}, "site"),
        ("/v1/rounds/-1/updates", {"site": "fab-a"}, "round"),
        ("/v1/rounds/one/updates", {"site": "fab-a"}, "round"),
        ("/v1/rounds/0/close", {"participants": "fab-a"}, "participants"),
        ("/v1/rounds/0/close", {"participants": ["fab-a", 3]}, "participants.1"),
        (
            "/v1/rounds/0/close",
            {"participants": ["fab-a"], "rejected": [{"site": "fab-b"}]},
            "rejected.0.reason",
        ),
        ("/v1/rounds/-3/close", {"participants": ["fab-a"]}, "round"),
        ("/v1/rounds/0/close", {"participants": ["fab-a"] * 257}, "participants"),
        ("/v1/rounds/0/close", {"participants": ["Fab_A"]}, "participants.0"),
        ("/v1/rounds/0/close", {"participants": ["a" * 64]}, "participants.0"),
        (
            "/v1/rounds/0/close",
            {"participants": ["fab-a"], "rejected": [{"site": "../x", "reason": "r"}]},
            "rejected.0.site",
        ),
        (
            "/v1/rounds/0/close",
            {"participants": ["fab-a"], "rejected": [{"site": "fab-b", "reason": "r" * 4097}]},
            "rejected.0.reason",
        ),
        (
            "/v1/rounds/0/close",
            {"participants": [], "rejected": [{"site": "fab-b", "reason": "r"}] * 257},
            "rejected",
        ),
        ("/v1/rounds/10001/close", {"participants": ["fab-a"]}, "round"),
        ("/v1/merge", {"round": 10001}, "round"),
        ("/v1/merge", {"round": -1}, "round"),
        ("/v1/merge", {"round": "last"}, "round"),
        ("/v1/merge", {}, "round"),
        ("/v1/merge", None, "body"),
    ],
)
def test_malformed_requests_are_422_naming_the_field(
    client: TestClient, s3_store: S3Store, path: str, body: Any, field: str
) -> None:
    before = s3_store.list()
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    message = _error(response, 422, "invalid-request")
    reply = ErrorReply.model_validate(response.json())
    assert reply.error.details, reply
    assert field in [problem.field for problem in reply.error.details], reply
    assert message.startswith(f"{reply.error.details[0].field}: ")
    assert s3_store.list() == before


def test_unknown_routes_and_methods_are_json_errors(client: TestClient) -> None:
    assert "/v1/nothing" in _error(client.get("/v1/nothing"), 404, "not-found")
    _error(client.get("/nothing"), 404, "not-found")
    response = client.delete("/v1/initialize")
    _error(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


def test_a_round_without_a_global_model_is_409(client: TestClient, s3_store: S3Store) -> None:
    _error(client.post("/v1/rounds/0/updates", json={"site": "fab-a"}), 409, "no-global-model")
    _error(client.post("/v1/rounds/0/close", json={"participants": ["fab-a"]}), 409, "no-global-model")
    _error(client.post("/v1/merge", json={"round": 0}), 409, "no-global-model")
    assert s3_store.list() == []


def test_a_spec_whose_exchange_pattern_matches_nothing_is_refused_at_initialize(tmp_path: Path) -> None:
    spec = FederatedTrainingSpec.model_validate(
        {**SPEC_DOCUMENT, "exchange": {"policy": "fixed", "layers": ["blocks.*.lora_*", "fc_norm.*"]}}
    )
    store = LocalStore(tmp_path / "store")
    app = create_app(RoundAggregator(store, LAYOUT, spec), TOKEN)
    with TestClient(app, headers=AUTH) as client:
        message = _error(client.post("/v1/initialize"), 409, "invalid-spec")
    assert "spec.exchange.layers[1]: 'fc_norm.*' matches no trainable tensor" in message
    assert store.list() == [], "no global model is written"


def test_store_failures_are_503(s3_endpoint: str) -> None:
    missing = S3Store(bucket=f"missing-{uuid.uuid4().hex[:12]}", endpoint=s3_endpoint)
    with TestClient(_app(missing), headers=AUTH) as client:
        message = _error(client.get("/v1/rounds/0"), 503, "store-unavailable")
        assert "NoSuchBucket" in message


# --------------------------------------------------------------------------------------------------
# a round through the API


def test_a_round_through_the_api(client: TestClient, s3_store: S3Store) -> None:
    initialized = client.post("/v1/initialize")
    assert initialized.status_code == 200, initialized.text
    model_uri = ModelReply.model_validate(initialized.json()).model_uri
    assert model_uri == s3_store.uri(LAYOUT.global_model(0))
    assert client.post("/v1/initialize").json() == initialized.json()

    deltas = _deltas(s3_store)
    sizes = {
        site: len(_write_update(s3_store, site, deltas[site], SAMPLES[site])) for site in ("fab-a", "fab-b")
    }
    poisoned = {name: tensor.clone() for name, tensor in deltas["fab-c"].items()}
    next(iter(poisoned.values())).view(-1)[0] = math.nan
    sizes["fab-c"] = len(_write_update(s3_store, "fab-c", poisoned, SAMPLES["fab-c"]))

    verdicts = {}
    for site in SITES:
        response = client.post("/v1/rounds/0/updates", json={"site": site})
        assert response.status_code == 200, response.text  # a rejection is a verdict, not an error
        verdicts[site] = UpdateVerdict.model_validate(response.json())
    assert verdicts["fab-a"].accepted
    assert verdicts["fab-b"].accepted
    assert (verdicts["fab-c"].accepted, verdicts["fab-c"].reason) == (False, "nonfinite")
    assert verdicts["fab-a"].update_bytes == sizes["fab-a"]
    # A repeated submit gives the recorded verdict (and is not counted twice below).
    assert client.post("/v1/rounds/0/updates", json={"site": "fab-a"}).json() == verdicts["fab-a"].model_dump(
        mode="json", by_alias=True
    )

    open_round = RoundReply.model_validate(client.get("/v1/rounds/0").json())
    assert (open_round.round, open_round.closed, open_round.manifest) == (0, False, None)
    assert open_round.verdicts == verdicts

    # An empty close is the engine's mistake, never a site's: the library refuses it.
    assert "no accepted update" in _error(
        client.post("/v1/rounds/0/close", json={"participants": []}), 409, "aggregation-failed"
    )
    assert not s3_store.exists(LAYOUT.manifest(0))

    rejected = [{"site": "fab-c", "reason": f"nonfinite: {verdicts['fab-c'].message}"}]
    closed = client.post(
        "/v1/rounds/0/close", json={"participants": ["fab-a", "fab-b"], "rejected": rejected}
    )
    assert closed.status_code == 200, closed.text
    manifest = RoundManifest.model_validate(closed.json())
    assert [p.site for p in manifest.participants] == ["fab-a", "fab-b"]
    assert manifest.participants[0].weight == pytest.approx(120 / 165)
    assert [r.model_dump() for r in manifest.rejected] == rejected
    assert manifest.model_uri == s3_store.uri(LAYOUT.global_model(1))
    assert RoundManifest.model_validate_json(s3_store.get_bytes(LAYOUT.manifest(0))) == manifest

    again = client.post("/v1/rounds/0/close", json={"participants": ["fab-a", "fab-b"], "rejected": rejected})
    assert again.json() == closed.json()
    # Other participants too: a closed round answers with its manifest.
    assert client.post("/v1/rounds/0/close", json={"participants": ["fab-a"]}).json() == closed.json()

    closed_round = RoundReply.model_validate(client.get("/v1/rounds/0").json())
    assert closed_round.closed
    assert closed_round.manifest == manifest
    assert closed_round.verdicts["fab-a"].accepted
    assert closed_round.verdicts["fab-a"].sha256 == verdicts["fab-a"].sha256
    assert (closed_round.verdicts["fab-c"].accepted, closed_round.verdicts["fab-c"].reason) == (
        False,
        "closed",
    )
    assert RoundReply.model_validate(client.get("/v1/rounds/1").json()).verdicts == {}

    # A round whose previous round is not closed has no global model: a 404, not a stale merged model.
    assert "round 1 is not closed" in _error(
        client.post("/v1/merge", json={"round": 2}), 404, "unknown-round"
    )
    merged = client.post("/v1/merge", json={"round": 1})
    assert merged.status_code == 200, merged.text
    assert ModelReply.model_validate(merged.json()).model_uri == s3_store.uri(LAYOUT.merged_model())
    assert decode(s3_store.get_bytes(LAYOUT.merged_model())).meta.kind is PayloadKind.MERGED
    assert client.post("/v1/merge", json={"round": 1}).json() == merged.json()
    _error(client.post("/v1/merge", json={"round": 999}), 404, "unknown-round")

    text = client.get("/metrics").text
    labels = {"namespace": "lab", "training": "wafers"}
    updates = "fedtrain_aggregator_updates_total"
    assert _sample(text, updates, verdict="accepted", reason="", **labels) == 2
    assert _sample(text, updates, verdict="rejected", reason="nonfinite", **labels) == 1
    assert _sample(text, "fedtrain_aggregator_update_bytes_total", **labels) == sum(sizes.values())
    assert _sample(text, "fedtrain_aggregator_fold_seconds_count", **labels) == 3
    assert _sample(text, "fedtrain_aggregator_rounds_closed_total", **labels) == 1
    assert _sample(text, "fedtrain_aggregator_round", **labels) == 0
    requests = "fedtrain_aggregator_requests_total"
    assert _sample(text, requests, endpoint="/v1/rounds/{round}/updates", code="200", **labels) == 4
    assert _sample(text, requests, endpoint="/v1/rounds/{round}/close", code="409", **labels) == 1
    assert _sample(text, requests, endpoint="/v1/rounds/{round}/close", code="200", **labels) == 3


def _manifest_facts(manifest: RoundManifest) -> dict[str, object]:
    """What must not depend on when, or by which process, the round was closed."""
    return manifest.model_dump(exclude={"closed_at", "model_sha256", "model_uri"})


def _tensors_sha256(store: ObjectStore, key: str) -> str:
    # The file's own sha256 differs between two writes (the header records when it was written).
    return read_metadata(store.get_bytes(key)).tensors_sha256


def test_a_restarted_service_closes_the_round_from_the_store(s3_store: S3Store, tmp_path: Path) -> None:
    with TestClient(_app(s3_store), headers=AUTH) as first:
        assert first.post("/v1/initialize").status_code == 200
        deltas = _deltas(s3_store)
        for site in SITES:
            _write_update(s3_store, site, deltas[site], SAMPLES[site])
        for site in ("fab-a", "fab-b"):
            assert first.post("/v1/rounds/0/updates", json={"site": site}).json()["accepted"]

    # The control: the same objects, closed by one uninterrupted aggregator in another store.
    control_store = LocalStore(tmp_path / "control")
    for key in s3_store.list():
        control_store.put_bytes(key, s3_store.get_bytes(key))
    control = RoundAggregator(control_store, LAYOUT, SPEC)
    for site in SITES:
        assert control.submit(0, site).accepted
    expected = control.close(0, list(SITES))

    # The pod restarted: the new process knows nothing of the round until the operator closes it.
    with TestClient(_app(s3_store), headers=AUTH) as second:
        assert RoundReply.model_validate(second.get("/v1/rounds/0").json()).verdicts == {}
        closed = second.post("/v1/rounds/0/close", json={"participants": list(SITES)})
        assert closed.status_code == 200, closed.text
        manifest = RoundManifest.model_validate(closed.json())
        text = second.get("/metrics").text
    assert _manifest_facts(manifest) == _manifest_facts(expected)
    assert [p.sha256 for p in manifest.participants] == [p.sha256 for p in expected.participants]
    assert _tensors_sha256(s3_store, LAYOUT.global_model(1)) == _tensors_sha256(
        control_store, LAYOUT.global_model(1)
    )
    assert _sample(text, "fedtrain_aggregator_rounds_closed_total", namespace="lab", training="wafers") == 1


# --------------------------------------------------------------------------------------------------
# the OpenAPI schema, and schemathesis against it


def test_the_schema_and_its_pages_are_served_only_when_asked(client: TestClient, s3_store: S3Store) -> None:
    for path in ("/openapi.json", "/docs", "/redoc"):
        _error(client.get(path), 404, "not-found")
    with TestClient(_app(s3_store, serve_docs=True)) as documented:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert documented.get(path).status_code == 200, path


def test_the_schema_declares_the_bearer_scheme_and_the_errors(s3_store: S3Store) -> None:
    with TestClient(_app(s3_store, serve_docs=True)) as client:
        schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The training's aggregator token (the Secret the operator creates).",
    }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"bearer": []}], path
                assert {"401", "422", "503"} <= set(operation["responses"]), path
            else:
                assert "security" not in operation, path
    for name in (
        "SubmitUpdateRequest",
        "CloseRoundRequest",
        "SecureAggregationRequest",
        "SecureAggregationReply",
        "MergeRequest",
        "ModelReply",
        "RoundReply",
    ):
        for field, definition in schema["components"]["schemas"][name]["properties"].items():
            assert definition.get("description"), (name, field)
    # FastAPI's default error body appears nowhere: every error is an ErrorReply.
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize("authorized", [True, False], ids=["token", "no-token"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_the_api_conforms_to_its_schema(s3_store: S3Store, mode: GenerationMode, authorized: bool) -> None:
    aggregator = RoundAggregator(s3_store, LAYOUT, SPEC)
    aggregator.initialize()  # so that generated calls reach the library, not only its 409s
    app = create_app(aggregator, TOKEN, serve_docs=True)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # One hypothesis run per operation rather than schemathesis' pytest plugin: its lazy loading
    # (`from_fixture`) does not run under pytest 9.
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) == 10
    if mode is GenerationMode.NEGATIVE:  # only what takes input can be sent invalid input
        operations = [op for op in operations if op.body or len(list(op.iter_parameters()))]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25 if authorized else 10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: schemathesis.Case[Any]) -> None:
            response = case.call_and_validate(headers=AUTH if authorized else {})
            assert response.status_code < 500, response.text
            if not authorized and case.path.startswith("/v1/"):
                assert response.status_code == 401, response.text

        conforms()


# --------------------------------------------------------------------------------------------------
# settings


def _training_document(
    storage: dict[str, Any] | None, pretrained: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        **SPEC_DOCUMENT,
        "model": {**MODEL, **({"pretrained": pretrained} if pretrained else {})},
    }
    if storage is not None:
        spec["storage"] = storage
    return {
        "apiVersion": "fedtrain.io/v1alpha1",
        "kind": "FederatedTraining",
        "metadata": {"name": LAYOUT.name, "namespace": LAYOUT.namespace},
        "spec": spec,
    }


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("FEDTRAIN_AGGREGATOR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_come_from_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    training_file = tmp_path / "training.yaml"
    training_file.write_text(
        yaml.safe_dump(_training_document({"bucket": "models", "endpoint": "http://s3:9000"}))
    )
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    clean_env.setenv("FEDTRAIN_AGGREGATOR_TRAINING_FILE", str(training_file))
    clean_env.setenv("FEDTRAIN_AGGREGATOR_TOKEN_FILE", str(token_file))
    clean_env.setenv("FEDTRAIN_AGGREGATOR_PORT", "9090")

    settings_ = load_settings()
    assert (settings_.host, settings_.port, settings_.bearer_token()) == ("0.0.0.0", 9090, TOKEN)
    assert load_settings(port=8181, host="127.0.0.1").port == 8181  # the command line wins
    resource = settings_.training()
    assert layout_of(resource) == LAYOUT
    store = store_of(resource)
    assert (store.bucket, store.prefix, store.endpoint) == ("models", "fedtrain", "http://s3:9000")
    assert pretrained_weights(resource) is None
    # What bounds the service's inputs, and whether it serves its schema: safe defaults.
    assert settings_.serve_docs is False
    assert (settings_.max_body_bytes, settings_.body_timeout_seconds) == (2 * 1024 * 1024, 10.0)
    assert (settings_.header_timeout_seconds, settings_.max_site_samples) == (10.0, 10_000_000)
    clean_env.setenv("FEDTRAIN_AGGREGATOR_SERVE_DOCS", "true")
    clean_env.setenv("FEDTRAIN_AGGREGATOR_MAX_SITE_SAMPLES", "5000")
    assert (load_settings().serve_docs, load_settings().max_site_samples) == (True, 5000)
    clean_env.setenv("FEDTRAIN_AGGREGATOR_MAX_BODY_BYTES", "10")
    with pytest.raises(SettingsError, match="FEDTRAIN_AGGREGATOR_MAX_BODY_BYTES"):
        load_settings()


def test_a_training_without_a_namespace_is_in_default(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    document = _training_document({"bucket": "models"})
    del document["metadata"]["namespace"]
    assert layout_of(FederatedTraining.model_validate(document)) == TrainingLayout("default", LAYOUT.name)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "FEDTRAIN_AGGREGATOR_TRAINING_FILE: is not set"),
        (
            {"TRAINING_FILE": "t.yaml"},
            "FEDTRAIN_AGGREGATOR_TOKEN and FEDTRAIN_AGGREGATOR_TOKEN_FILE (neither",
        ),
        ({"TRAINING_FILE": "t.yaml", "TOKEN": "a", "TOKEN_FILE": "f"}, "(both are set)"),
        ({"TRAINING_FILE": "t.yaml", "TOKEN": "a", "PORT": "http"}, "FEDTRAIN_AGGREGATOR_PORT: "),
        ({"TRAINING_FILE": "t.yaml", "TOKEN": "a", "PORT": "0"}, "FEDTRAIN_AGGREGATOR_PORT: "),
    ],
)
def test_bad_settings_name_the_variable(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(f"FEDTRAIN_AGGREGATOR_{name}", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert expected in str(raised.value)


def test_a_bad_token_or_training_file_names_the_variable(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("FEDTRAIN_AGGREGATOR_TRAINING_FILE", str(tmp_path / "missing.yaml"))
    clean_env.setenv("FEDTRAIN_AGGREGATOR_TOKEN_FILE", str(tmp_path / "no-token"))
    settings_ = load_settings()
    with pytest.raises(SettingsError, match=r"FEDTRAIN_AGGREGATOR_TOKEN_FILE=.*cannot read the token"):
        settings_.bearer_token()
    (tmp_path / "no-token").write_text("\n")
    with pytest.raises(SettingsError, match=r"FEDTRAIN_AGGREGATOR_TOKEN_FILE=.*the token is empty"):
        settings_.bearer_token()
    with pytest.raises(SettingsError, match=r"FEDTRAIN_AGGREGATOR_TRAINING_FILE=.*cannot read the file"):
        settings_.training()
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(_training_document(None)))
    with pytest.raises(SettingsError, match=r"spec\.storage is required"):
        settings_.training()
    (tmp_path / "missing.yaml").write_text(
        yaml.safe_dump({**_training_document(None), "spec": {"sites": []}})
    )
    with pytest.raises(SettingsError, match=r"TRAINING_FILE=.*: spec\.model: Field required"):
        settings_.training()


def test_pretrained_weights_come_from_a_file_or_the_store(s3_store: S3Store, tmp_path: Path) -> None:
    storage = {"bucket": s3_store.bucket, "endpoint": s3_store.endpoint}
    on_disk = FederatedTraining.model_validate(
        _training_document(storage, {"source": "file", "location": str(tmp_path / "base.safetensors")})
    )
    assert pretrained_weights(on_disk) == tmp_path / "base.safetensors"
    s3_store.put_bytes("weights/base.safetensors", b"weights")
    in_store = FederatedTraining.model_validate(
        _training_document(
            storage, {"source": "uri", "location": f"s3://{s3_store.bucket}/test/weights/base.safetensors"}
        )
    )
    assert pretrained_weights(in_store) == b"weights"


# --------------------------------------------------------------------------------------------------
# python -m fedtrain.aggregator serve


def _env(**settings_: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FEDTRAIN_AGGREGATOR_")}
    env.update({f"FEDTRAIN_AGGREGATOR_{name}": value for name, value in settings_.items()})
    return env


def _call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_service_runs_from_the_command_line(s3_endpoint: str, tmp_path: Path) -> None:
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    S3Store(bucket=bucket, endpoint=s3_endpoint).ensure_bucket()
    training_file = tmp_path / "training.yaml"
    training_file.write_text(yaml.safe_dump(_training_document({"bucket": bucket, "endpoint": s3_endpoint})))
    port = free_port()
    env = _env(TOKEN=TOKEN, PORT=str(port), HOST="127.0.0.1")
    log_path = tmp_path / "aggregator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedtrain.aggregator", "serve", "--training-file", str(training_file)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                if _call(f"{base}/healthz") == (200, {"status": "ok"}):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert _call(f"{base}/readyz") == (200, {"status": "ready"})
        assert _call(f"{base}/v1/rounds/0")[0] == 401
        # A call that reads the bucket; initialize would spend most of the test importing timm.
        status, reply = _call(f"{base}/v1/rounds/0", token=TOKEN)
        assert status == 200, reply
        assert reply == {"round": 0, "closed": False, "manifest": None, "verdicts": {}}
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    output = log_path.read_text()
    # uvicorn shuts down gracefully, then re-raises the signal so the process ends by it.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert f"aggregator of lab/wafers on 127.0.0.1:{port}, store s3://{bucket}/fedtrain/lab/wafers" in output
    assert '"GET /v1/rounds/0 HTTP/1.1" 200' in output  # uvicorn's access line, through our format
    assert output.splitlines()[0][:4].isdigit()  # lines start with a timestamp


def test_the_service_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    training_file = tmp_path / "training.yaml"
    training_file.write_text(yaml.safe_dump(_training_document({"bucket": "models"})))
    done = subprocess.run(
        [sys.executable, "-m", "fedtrain.aggregator", "serve"],
        env=_env(TRAINING_FILE=str(training_file)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "FEDTRAIN_AGGREGATOR_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
