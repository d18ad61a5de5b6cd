"""The aggregator: streamed FedAvg against numpy, rejections, idempotence, restarts, S3, merging.

Updates are written to the store exactly as trainers upload them (fedtrain.layout keys, codec.encode)
and the next global model is read back from the store, so every test goes through the same bytes a
real round does.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtrain.aggregator.rounds import AggregationError, RoundAggregator, UnknownRoundError
from fedtrain.aggregator.strategies import FedAvg, WeightedMean, make_strategy, site_weight
from fedtrain.api import (
    ExchangePolicy,
    ExchangeSpec,
    FederatedTrainingSpec,
    RejectedUpdate,
    StrategyName,
    TrainingMode,
    TransferDtype,
    Weighting,
)
from fedtrain.codec import Metadata, PayloadKind, decode, encode, read_metadata
from fedtrain.layout import TrainingLayout
from fedtrain.messages import RoundManifest
from fedtrain.model import build_model
from fedtrain.store import LocalStore, ObjectStore, S3Store, StoreError

LAYOUT = TrainingLayout(namespace="lab", name="wafers")
BASE = "0f" * 32
MODEL = {
    "name": "vit_small_patch14_dinov2",
    "numClasses": 9,
    "imageSize": 28,
    "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
}
#: Arbitrary tensors for tests that write the round-0 global model themselves.
SHAPES: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.weight": (96, 32),
    "blocks.0.norm1.weight": (32,),
    "head.bias": (9,),
    "head.weight": (9, 32),
    "pos_embed": (1, 5, 32),
}
SITES = ("fab-a", "fab-b", "fab-c")
SAMPLES = {"fab-a": 120, "fab-b": 45, "fab-c": 300}
EXPLICIT = {"fab-a": 0.5, "fab-b": 2.0, "fab-c": 1.25}


def _spec(
    sites: Sequence[str] = SITES,
    weighting: Weighting = Weighting.SAMPLES,
    max_update_norm: float | None = None,
    lora_rank: int | str = "auto",
    transfer_dtype: TransferDtype = TransferDtype.FP32,
) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": MODEL,
            "lora": {"rank": lora_rank},
            "training": {"transferDtype": transfer_dtype.value},
            "aggregation": {"weighting": weighting.value, "maxUpdateNorm": max_update_norm},
            "sites": [
                {"name": site, "data": {"synthetic": {"samples": 400}}, "weight": EXPLICIT.get(site, 1.0)}
                for site in sites
            ],
        }
    )


def _random(shapes: Mapping[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _write_global(store: ObjectStore, tensors: Mapping[str, torch.Tensor], fingerprint: str = BASE) -> None:
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=fingerprint)
    store.put_bytes(LAYOUT.global_model(0), encode(tensors, meta))


def _update_bytes(
    site: str,
    delta: Mapping[str, torch.Tensor],
    samples: int,
    dtype: TransferDtype = TransferDtype.FP32,
    fingerprint: str = BASE,
    round_index: int = 0,
) -> bytes:
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=round_index,
        site=site,
        samples=samples,
        transfer_dtype=dtype,
        base_fingerprint=fingerprint,
        timings={"train_seconds": 1.5},
    )
    return encode(delta, meta)


def _write_update(
    store: ObjectStore,
    site: str,
    delta: Mapping[str, torch.Tensor],
    samples: int,
    dtype: TransferDtype = TransferDtype.FP32,
) -> bytes:
    data = _update_bytes(site, delta, samples, dtype)
    store.put_bytes(LAYOUT.update(0, site), data)
    return data


def _numpy_fedavg(
    global_tensors: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """global + sum(w_i * delta_i) / sum(w_i), in float64."""
    total = sum(weights[site] for site in deltas)
    return {
        name: tensor.double().numpy()
        + sum(weights[site] * delta[name].double().numpy() for site, delta in deltas.items()) / total
        for name, tensor in global_tensors.items()
    }


def _next_global(store: ObjectStore, round_index: int = 0) -> dict[str, torch.Tensor]:
    payload = decode(store.get_bytes(LAYOUT.global_model(round_index + 1)))
    assert payload.meta.kind is PayloadKind.MODEL
    assert payload.meta.round == round_index + 1
    assert payload.meta.transfer_dtype is TransferDtype.FP32
    return dict(payload.tensors)


def _assert_model(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, np.ndarray], rtol: float = 1e-6
) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in actual.items():
        assert tensor.dtype == torch.float32, name
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=rtol, atol=rtol, err_msg=name)


def _file_identity(store: LocalStore, key: str) -> tuple[int, int]:
    """Inode and mtime: a rewrite (a new file renamed over the old one) changes both."""
    path = store.local_path(key)
    assert path is not None
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _tensor_region(data: bytes) -> bytes:
    """The tensor bytes of a safetensors file (the header also holds a creation time)."""
    (length,) = struct.unpack("<Q", data[:8])
    return data[8 + length :]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def global_tensors() -> dict[str, torch.Tensor]:
    return _random(SHAPES, seed=0)


@pytest.fixture
def deltas() -> dict[str, dict[str, torch.Tensor]]:
    return {site: _random(SHAPES, seed=index + 1, scale=0.01) for index, site in enumerate(SITES)}


def _prepare(
    store: ObjectStore,
    global_tensors: Mapping[str, torch.Tensor],
    deltas: Mapping[str, Mapping[str, torch.Tensor]],
    dtype: TransferDtype = TransferDtype.FP32,
) -> None:
    _write_global(store, global_tensors)
    for site, delta in deltas.items():
        _write_update(store, site, delta, SAMPLES[site], dtype)


# --------------------------------------------------------------------------------------------------
# FedAvg equals the direct computation


@pytest.mark.parametrize("weighting", list(Weighting))
def test_streamed_fedavg_equals_numpy(
    weighting: Weighting,
    store: LocalStore,
    global_tensors: dict[str, torch.Tensor],
    deltas: dict[str, dict[str, torch.Tensor]],
) -> None:
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec(weighting=weighting))
    for site in SITES:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
        assert verdict.samples == SAMPLES[site]
        assert verdict.train_seconds == 1.5
        assert verdict.update_bytes == len(store.get_bytes(LAYOUT.update(0, site)))
    manifest = aggregator.close(0, list(SITES))

    weights = {
        Weighting.SAMPLES: {site: float(SAMPLES[site]) for site in SITES},
        Weighting.UNIFORM: dict.fromkeys(SITES, 1.0),
        Weighting.EXPLICIT: EXPLICIT,
    }[weighting]
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, deltas, weights))
    total = sum(weights.values())
    assert [p.site for p in manifest.participants] == list(SITES)
    for participant in manifest.participants:
        assert participant.weight == pytest.approx(weights[participant.site] / total, rel=1e-12)
    assert math.fsum(p.weight for p in manifest.participants) == pytest.approx(1.0, abs=1e-12)
    assert manifest.weighting == weighting.value
    assert manifest.strategy == "fedavg"


@pytest.mark.parametrize("dtype", [TransferDtype.BF16, TransferDtype.FP16])
def test_half_precision_updates_are_summed_in_fp32(
    dtype: TransferDtype,
    store: LocalStore,
    global_tensors: dict[str, torch.Tensor],
    deltas: dict[str, dict[str, torch.Tensor]],
) -> None:
    _prepare(store, global_tensors, deltas, dtype)
    aggregator = RoundAggregator(store, LAYOUT, _spec(transfer_dtype=dtype))
    assert all(aggregator.submit(0, site).accepted for site in SITES)
    aggregator.close(0, list(SITES))
    exact = dict(decode(store.get_bytes(LAYOUT.exact_global_model(1))).tensors)

    torch_dtype = {TransferDtype.BF16: torch.bfloat16, TransferDtype.FP16: torch.float16}[dtype]
    rounded = {
        site: {name: tensor.to(torch_dtype).float() for name, tensor in delta.items()}
        for site, delta in deltas.items()
    }
    weights = {site: float(SAMPLES[site]) for site in SITES}
    expected = _numpy_fedavg(global_tensors, rounded, weights)
    _assert_model(exact, expected, rtol=1e-6)
    # The rounding is visible: the unrounded deltas give another model.
    unrounded = _numpy_fedavg(global_tensors, deltas, weights)
    assert not np.allclose(exact["head.weight"].numpy(), unrounded["head.weight"], rtol=0, atol=1e-7)


def test_fedavg_from_the_real_initial_model(store: LocalStore) -> None:
    spec = _spec()
    aggregator = RoundAggregator(store, LAYOUT, spec)
    uri = aggregator.initialize()
    assert uri == store.uri(LAYOUT.global_model(0))
    initial = decode(store.get_bytes(LAYOUT.global_model(0)))
    model = build_model(spec)
    assert initial.meta.base_fingerprint == model.base_fingerprint
    assert sorted(initial.tensors) == model.exchanged_names()
    identity = _file_identity(store, LAYOUT.global_model(0))
    assert aggregator.initialize() == uri
    assert _file_identity(store, LAYOUT.global_model(0)) == identity

    shapes = {name: tuple(tensor.shape) for name, tensor in initial.tensors.items()}
    deltas = {site: _random(shapes, seed=10 + index, scale=0.01) for index, site in enumerate(SITES)}
    for site, delta in deltas.items():
        data = _update_bytes(site, delta, SAMPLES[site], fingerprint=model.base_fingerprint)
        store.put_bytes(LAYOUT.update(0, site), data)
        assert aggregator.submit(0, site).accepted
    aggregator.close(0, list(SITES))

    expected = _numpy_fedavg(dict(initial.tensors), deltas, {s: float(SAMPLES[s]) for s in SITES})
    _assert_model(_next_global(store), expected)
    # The next model loads back into the model the sites build.
    model.load_exchanged(_next_global(store))


# --------------------------------------------------------------------------------------------------
# rejected updates are never folded


def test_every_bad_update_is_rejected_and_not_folded(
    store: LocalStore, global_tensors: dict[str, torch.Tensor]
) -> None:
    good = {"good-a": 120, "good-b": 45}
    bad = [
        "corrupt",
        "pickled",
        "shape",
        "unknown",
        "nan",
        "base",
        "norm",
        "nosamples",
        "other-round",
        "other-site",
        "missing",
    ]
    spec = _spec(sites=[*good, *bad], max_update_norm=5.0)
    _write_global(store, global_tensors)
    deltas = {site: _random(SHAPES, seed=index + 1, scale=0.01) for index, site in enumerate(good)}
    for site, delta in deltas.items():
        _write_update(store, site, delta, good[site])

    def put(site: str, data: bytes) -> None:
        store.put_bytes(LAYOUT.update(0, site), data)

    delta = _random(SHAPES, seed=99, scale=0.01)
    corrupt = bytearray(_update_bytes("corrupt", delta, 10))
    corrupt[-3] ^= 0xFF
    put("corrupt", bytes(corrupt))
    put("pickled", pickle.dumps({name: tensor.numpy() for name, tensor in delta.items()}))
    put("shape", _update_bytes("shape", {**delta, "head.weight": torch.zeros(32, 9)}, 10))
    put("unknown", _update_bytes("unknown", {**delta, "blocks.9.mlp.fc1.bias": torch.zeros(4)}, 10))
    poisoned = {name: tensor.clone() for name, tensor in delta.items()}
    poisoned["head.bias"][3] = math.nan
    put("nan", _update_bytes("nan", poisoned, 10))
    put("base", _update_bytes("base", delta, 10, fingerprint="a0" * 32))
    put("norm", _update_bytes("norm", {name: 1000 * tensor for name, tensor in delta.items()}, 10))
    put("nosamples", _update_bytes("nosamples", delta, 0))
    put("other-round", _update_bytes("other-round", delta, 10, round_index=1))
    put("other-site", _update_bytes("good-a", delta, 10))

    aggregator = RoundAggregator(store, LAYOUT, spec)
    verdicts = {site: aggregator.submit(0, site) for site in [*bad[:5], *good, *bad[5:]]}

    expected_reasons = {
        "corrupt": ("checksum", "checksum mismatch"),
        "pickled": ("pickle", "pickle"),
        "shape": ("shape", "head.weight has shape (32, 9)"),
        "unknown": ("names", "unknown tensors: blocks.9.mlp.fc1.bias"),
        "nan": ("nonfinite", "head.bias holds NaN or Inf"),
        "base": ("base-model", "different base model"),
        "norm": ("norm", "exceeds aggregation.maxUpdateNorm 5"),
        "nosamples": ("samples", "positive sample count"),
        "other-round": ("mismatch", "round 1 site other-round"),
        "other-site": ("mismatch", "round 0 site good-a"),
        "missing": ("missing", "no update at"),
    }
    for site, (reason, message) in expected_reasons.items():
        verdict = verdicts[site]
        assert not verdict.accepted, site
        assert verdict.reason == reason, (site, verdict.message)
        assert message in (verdict.message or ""), (site, verdict.message)
    assert verdicts["norm"].norm is not None
    assert verdicts["norm"].norm > 5.0
    assert all(verdicts[site].accepted for site in good)

    engine_rejected = [RejectedUpdate(site="corrupt", reason="checksum: recorded by the engine")]
    manifest = aggregator.close(0, list(good), engine_rejected)

    weights = {site: float(samples) for site, samples in good.items()}
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, deltas, weights))
    assert [p.site for p in manifest.participants] == list(good)
    assert math.fsum(p.weight for p in manifest.participants) == pytest.approx(1.0, abs=1e-12)
    assert manifest.participants[0].weight == pytest.approx(120 / 165)
    for participant in manifest.participants:
        data = store.get_bytes(LAYOUT.update(0, participant.site))
        assert participant.sha256 == read_metadata(data).tensors_sha256
        assert participant.samples == good[participant.site]
        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in deltas[participant.site].values()))
        assert participant.norm == pytest.approx(norm, rel=1e-5)

    rejected = {entry.site: entry.reason for entry in manifest.rejected}
    assert sorted(rejected) == sorted(bad)
    assert rejected["corrupt"] == "checksum: recorded by the engine"  # the engine's record wins
    for site, (reason, message) in expected_reasons.items():
        if site != "corrupt":
            assert rejected[site].startswith(f"{reason}: "), rejected[site]
            assert message in rejected[site]

    # A closed round answers from its manifest.
    assert aggregator.submit(0, "good-a").accepted
    closed = aggregator.submit(0, "nan")
    assert (closed.accepted, closed.reason) == (False, "closed")
    assert (closed.message or "").startswith("nonfinite: ")


def test_a_participant_that_cannot_be_folded_is_left_out_of_the_round(
    store: LocalStore, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    # One site's file never fails the round: a participant whose update is gone is a rejection.
    _prepare(store, global_tensors, deltas)
    store.delete(LAYOUT.update(0, "fab-c"))
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    manifest = aggregator.close(0, list(SITES))
    assert [p.site for p in manifest.participants] == ["fab-a", "fab-b"]
    assert [r.site for r in manifest.rejected] == ["fab-c"]
    assert manifest.rejected[0].reason.startswith("missing: no update at")
    kept = {site: deltas[site] for site in ("fab-a", "fab-b")}
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, kept, SAMPLES), rtol=1e-5)


def test_a_round_whose_every_participant_is_left_out_keeps_the_model(
    store: LocalStore, global_tensors: dict[str, torch.Tensor]
) -> None:
    _write_global(store, global_tensors)
    manifest = RoundAggregator(store, LAYOUT, _spec()).close(0, ["fab-a"])
    assert manifest.participants == []
    assert [r.site for r in manifest.rejected] == ["fab-a"]
    _assert_model(_next_global(store), {n: t.numpy() for n, t in global_tensors.items()})


def _write_report(store: ObjectStore, site: str, round_index: int, fingerprint: str = BASE) -> None:
    evaluation = {"evaluation": {"accuracy": 0.9, "loss": 0.3, "macroF1": 0.8, "samples": 20}}
    meta = Metadata(
        kind=PayloadKind.REPORT,
        training=LAYOUT.name,
        round=round_index,
        site=site,
        base_fingerprint=fingerprint,
        metrics=evaluation,
    )
    store.put_bytes(LAYOUT.update(round_index, site), encode({}, meta))


def test_an_evaluation_report_in_a_training_round_is_rejected(
    store: LocalStore, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    _prepare(store, global_tensors, deltas)
    _write_report(store, "fab-c", 0)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    verdict = aggregator.submit(0, "fab-c")
    assert (verdict.accepted, verdict.reason) == (False, "report")
    manifest = aggregator.close(0, list(SITES))
    assert [p.site for p in manifest.participants] == ["fab-a", "fab-b"]
    assert [r.site for r in manifest.rejected] == ["fab-c"]


def test_a_report_where_sites_publish_their_models_names_the_site_s_model_or_is_rejected(
    store: LocalStore, global_tensors: dict[str, torch.Tensor]
) -> None:
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=1, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(1), encode(global_tensors, meta))
    for site in ("fab-a", "fab-b"):
        _write_report(store, site, 1)
    store.put_bytes(LAYOUT.site_merged_model("fab-a"), b"the site's own merged model")
    spec = _spec().model_copy(
        update={
            "training": _spec().training.model_copy(update={"rounds": 1}),
            "exchange": ExchangeSpec(policy=ExchangePolicy.EXCLUDE, layers=["head.*"], site_models=True),
        }
    )
    aggregator = RoundAggregator(store, LAYOUT, spec)
    published = aggregator.submit(1, "fab-a")
    assert published.accepted, published.message
    assert published.site_model_uri == store.uri(LAYOUT.site_merged_model("fab-a"))
    missing = aggregator.submit(1, "fab-b")
    assert (missing.accepted, missing.reason) == (False, "missing")
    assert "without the site's own merged model" in (missing.message or "")


def test_local_only_updates_carry_no_tensor_and_a_shared_tensor_is_rejected(
    store: LocalStore, global_tensors: dict[str, torch.Tensor]
) -> None:
    # mode localOnly: every trainable tensor is personal, so the global model holds none.
    _write_global(store, {})
    alone = _spec().model_copy(update={"mode": TrainingMode.LOCAL_ONLY})
    store.put_bytes(LAYOUT.update(0, "fab-a"), _update_bytes("fab-a", {}, SAMPLES["fab-a"]))
    store.put_bytes(LAYOUT.update(0, "fab-b"), _update_bytes("fab-b", global_tensors, SAMPLES["fab-b"]))
    aggregator = RoundAggregator(store, LAYOUT, alone)
    assert aggregator.submit(0, "fab-a").accepted
    leaked = aggregator.submit(0, "fab-b")
    assert not leaked.accepted, "a tensor sent in localOnly is refused"
    manifest = aggregator.close(0, ["fab-a"])
    assert [p.site for p in manifest.participants] == ["fab-a"]
    assert _next_global(store) == {}


def test_an_evaluation_report_of_another_base_model_is_rejected(
    store: LocalStore, global_tensors: dict[str, torch.Tensor]
) -> None:
    # The final round's sites send reports (metrics, no tensors): their evaluation means something
    # only if it was of a model built from this training's base model, as an update's must be.
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=1, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(1), encode(global_tensors, meta))
    for site, fingerprint in (("fab-a", BASE), ("fab-b", "a0" * 32)):
        _write_report(store, site, 1, fingerprint)
    spec = _spec().model_copy(update={"training": _spec().training.model_copy(update={"rounds": 1})})
    aggregator = RoundAggregator(store, LAYOUT, spec)

    same_base = aggregator.submit(1, "fab-a")
    assert same_base.accepted, same_base.message
    assert same_base.evaluation is not None
    other_base = aggregator.submit(1, "fab-b")
    assert not other_base.accepted
    assert other_base.reason == "base-model"
    assert "different base model" in (other_base.message or "")


# --------------------------------------------------------------------------------------------------
# idempotence and restarts


def test_submitting_a_site_twice_folds_it_once(
    store: LocalStore, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    first = aggregator.submit(0, "fab-a")
    # Even a re-uploaded update is not read again: the first verdict stands.
    _write_update(store, "fab-a", _random(SHAPES, seed=50, scale=0.5), 999)
    assert aggregator.submit(0, "fab-a") == first
    assert aggregator.submit(0, "fab-b").accepted
    assert aggregator.submit(0, "fab-a") == first
    manifest = aggregator.close(0, ["fab-a", "fab-b"])

    used = {site: deltas[site] for site in ("fab-a", "fab-b")}
    expected = _numpy_fedavg(global_tensors, used, {site: float(SAMPLES[site]) for site in used})
    _assert_model(_next_global(store), expected)
    assert [p.samples for p in manifest.participants] == [SAMPLES["fab-a"], SAMPLES["fab-b"]]


def test_closing_twice_returns_the_manifest_and_leaves_the_model_alone(
    store: LocalStore, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    for site in SITES:
        aggregator.submit(0, site)
    manifest = aggregator.close(0, list(SITES))
    model_path = store.local_path(LAYOUT.global_model(1))
    assert model_path is not None
    model_bytes, model_identity = model_path.read_bytes(), _file_identity(store, LAYOUT.global_model(1))
    manifest_bytes = store.get_bytes(LAYOUT.manifest(0))

    assert aggregator.close(0, list(SITES)) == manifest
    # Another aggregator, and other participants, get the recorded result too.
    again = RoundAggregator(store, LAYOUT, _spec()).close(0, ["fab-a"])
    assert again == manifest
    assert model_path.read_bytes() == model_bytes
    assert _file_identity(store, LAYOUT.global_model(1)) == model_identity
    assert store.get_bytes(LAYOUT.manifest(0)) == manifest_bytes
    assert RoundManifest.model_validate_json(manifest_bytes) == manifest
    assert manifest.model_key == LAYOUT.global_model(1)
    assert manifest.model_uri == store.uri(LAYOUT.global_model(1))
    assert manifest.model_sha256 == hashlib.sha256(model_bytes).hexdigest()


def _manifest_facts(manifest: RoundManifest) -> dict[str, object]:
    """What must not depend on when or by which process the round was closed."""
    return manifest.model_dump(exclude={"closed_at", "model_sha256", "model_uri"})


def test_a_restarted_aggregator_refolds_the_participants(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    uninterrupted_store = LocalStore(tmp_path / "uninterrupted")
    restarted_store = LocalStore(tmp_path / "restarted")
    for target in (uninterrupted_store, restarted_store):
        _prepare(target, global_tensors, deltas)

    uninterrupted = RoundAggregator(uninterrupted_store, LAYOUT, _spec())
    for site in SITES:
        uninterrupted.submit(0, site)
    expected = uninterrupted.close(0, list(SITES))

    crashed = RoundAggregator(restarted_store, LAYOUT, _spec())
    crashed.submit(0, "fab-a")
    crashed.submit(0, "fab-b")
    del crashed  # the process dies with its running sum
    restarted = RoundAggregator(restarted_store, LAYOUT, _spec())
    manifest = restarted.close(0, list(SITES))

    assert _manifest_facts(manifest) == _manifest_facts(expected)
    model = uninterrupted_store.get_bytes(LAYOUT.global_model(1))
    again = restarted_store.get_bytes(LAYOUT.global_model(1))
    assert _tensor_region(again) == _tensor_region(model)
    assert read_metadata(again).tensors_sha256 == read_metadata(model).tensors_sha256


def test_close_folds_exactly_the_participants(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    # fab-c was folded but the engine closes without it (it counted fab-c as a straggler).
    store = LocalStore(tmp_path / "all-submitted")
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    for site in SITES:
        assert aggregator.submit(0, site).accepted
    manifest = aggregator.close(0, ["fab-a", "fab-b", "fab-a"])

    used = {site: deltas[site] for site in ("fab-a", "fab-b")}
    weights = {site: float(SAMPLES[site]) for site in used}
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, used, weights))
    assert [p.site for p in manifest.participants] == ["fab-a", "fab-b"]
    assert math.fsum(p.weight for p in manifest.participants) == pytest.approx(1.0, abs=1e-12)

    fresh_store = LocalStore(tmp_path / "fresh")
    _prepare(fresh_store, global_tensors, deltas)
    fresh = RoundAggregator(fresh_store, LAYOUT, _spec()).close(0, ["fab-a", "fab-b"])
    assert _manifest_facts(fresh) == _manifest_facts(manifest)
    assert _tensor_region(fresh_store.get_bytes(LAYOUT.global_model(1))) == _tensor_region(
        store.get_bytes(LAYOUT.global_model(1))
    )


# --------------------------------------------------------------------------------------------------
# the manifest is written last


class RecordingStore(LocalStore):
    """A LocalStore that records the keys it reads and writes, and can fail writes with a given key ending."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: list[str] = []
        self.read: list[str] = []
        self.fail_suffix: str | None = None

    def get_bytes(self, key: str) -> bytes:
        self.read.append(key)
        return super().get_bytes(key)

    def local_path(self, key: str) -> Path:
        self.read.append(key)  # the aggregator reads a local store's files in place
        return super().local_path(key)

    def _check(self, key: str) -> None:
        if self.fail_suffix is not None and key.endswith(self.fail_suffix):
            raise StoreError(f"injected failure writing {key}")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._check(key)
        super().put_bytes(key, data)
        self.written.append(key)

    def put_file(self, key: str, path: Path) -> None:
        self._check(key)
        super().put_file(key, path)
        self.written.append(key)


def _all_submitted(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> tuple[RecordingStore, RoundAggregator]:
    """A recording store with round 0's global model and updates, every site submitted."""
    store = RecordingStore(tmp_path / "store")
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    for site in SITES:
        aggregator.submit(0, site)
    return store, aggregator


def test_the_manifest_is_written_after_the_model(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    store, aggregator = _all_submitted(tmp_path, global_tensors, deltas)

    with pytest.raises(AggregationError, match="no accepted update"):
        aggregator.close(0, [])
    assert not store.exists(LAYOUT.manifest(0))
    assert not store.exists(LAYOUT.global_model(1))

    store.written.clear()
    store.fail_suffix = "manifest.json"  # the process dies between the two writes
    with pytest.raises(StoreError):
        aggregator.close(0, list(SITES))
    assert store.written == [LAYOUT.global_model(1)]
    assert not store.exists(LAYOUT.manifest(0))
    assert RoundAggregator(store, LAYOUT, _spec()).manifest(0) is None

    store.written.clear()
    store.fail_suffix = None
    manifest = RoundAggregator(store, LAYOUT, _spec()).close(0, list(SITES))
    assert store.written == [LAYOUT.global_model(1), LAYOUT.manifest(0)]
    assert aggregator.close(0, list(SITES)) == manifest


def test_a_round_is_read_from_the_store_once(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    store, aggregator = _all_submitted(tmp_path, global_tensors, deltas)
    manifest = aggregator.close(0, list(SITES))
    assert aggregator.close(0, list(SITES)) == manifest
    assert aggregator.manifest(0) == manifest
    assert aggregator.submit(0, "fab-a").accepted  # a late re-send gets the recorded verdict
    # Whether the round was closed is asked once, before it is opened; after that this aggregator,
    # the only writer of the round's manifest, knows. Each update is read once, the model twice
    # (its signature when the round opens, its tensors when the next model is made).
    assert store.read.count(LAYOUT.manifest(0)) == 1
    assert sorted(store.read) == sorted(
        [LAYOUT.manifest(0), LAYOUT.global_model(0), LAYOUT.global_model(0)]
        + [f"{LAYOUT.round_dir(0)}/accepted-updates.json"]  # the checksums pinned at acceptance
        + [LAYOUT.update(0, site) for site in SITES]
    )
    # Another aggregator (a restarted one) reads the manifest from the store.
    assert RoundAggregator(store, LAYOUT, _spec()).manifest(0) == manifest
    assert store.read.count(LAYOUT.manifest(0)) == 2


def test_a_failed_model_write_leaves_the_round_open(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    store = RecordingStore(tmp_path / "store")
    _prepare(store, global_tensors, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    store.fail_suffix = "global.safetensors"
    with pytest.raises(StoreError):
        aggregator.close(0, list(SITES))
    assert not store.exists(LAYOUT.manifest(0))
    store.fail_suffix = None
    aggregator.close(0, list(SITES))
    weights = {site: float(SAMPLES[site]) for site in SITES}
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, deltas, weights))


# --------------------------------------------------------------------------------------------------
# S3


def test_s3_store_gives_the_local_result(
    s3_store: S3Store,
    store: LocalStore,
    global_tensors: dict[str, torch.Tensor],
    deltas: dict[str, dict[str, torch.Tensor]],
) -> None:
    results = {}
    for target in (store, s3_store):
        _prepare(target, global_tensors, deltas, TransferDtype.BF16)
        aggregator = RoundAggregator(target, LAYOUT, _spec(transfer_dtype=TransferDtype.BF16))
        verdicts = [aggregator.submit(0, site) for site in SITES]
        assert all(verdict.accepted for verdict in verdicts)
        manifest = aggregator.close(0, list(SITES))
        results[type(target).__name__] = (verdicts, manifest, target.get_bytes(LAYOUT.global_model(1)))

    local_verdicts, local_manifest, local_model = results["LocalStore"]
    s3_verdicts, s3_manifest, s3_model = results["S3Store"]
    assert s3_verdicts == local_verdicts
    assert _manifest_facts(s3_manifest) == _manifest_facts(local_manifest)
    assert s3_manifest.model_uri == f"s3://{s3_store.bucket}/test/{LAYOUT.global_model(1)}"
    assert _tensor_region(s3_model) == _tensor_region(local_model)
    assert (
        RoundAggregator(s3_store, LAYOUT, _spec(transfer_dtype=TransferDtype.BF16)).close(0, list(SITES))
        == s3_manifest
    )


# --------------------------------------------------------------------------------------------------
# the merged final model


def test_merged_model_loads_into_plain_timm_and_matches_the_peft_model(
    store: LocalStore, plain_vit: Any
) -> None:
    spec = _spec(sites=["fab-a"], lora_rank=4)
    aggregator = RoundAggregator(store, LAYOUT, spec)
    aggregator.initialize()
    initial = decode(store.get_bytes(LAYOUT.global_model(0)))
    assert initial.meta.config["rank"] == 4
    assert any("lora_B" in name for name in initial.tensors)
    shapes = {name: tuple(tensor.shape) for name, tensor in initial.tensors.items()}
    # LoRA B starts at zero; a perturbation of every exchanged tensor makes the adapters matter.
    delta = _random(shapes, seed=7, scale=0.05)
    store.put_bytes(
        LAYOUT.update(0, "fab-a"),
        _update_bytes("fab-a", delta, 30, fingerprint=initial.meta.base_fingerprint),
    )
    assert aggregator.submit(0, "fab-a").accepted
    aggregator.close(0, ["fab-a"])

    # Round 0's global model (the initial one) as the best: merged beside the final one.
    reply = aggregator.merge(1, best_round=0)
    uri = reply.model_uri
    assert uri == store.uri(LAYOUT.merged_model())
    assert reply.best_model_uri == store.uri(LAYOUT.best_merged_model())
    merged = decode(store.get_bytes(LAYOUT.merged_model()))
    assert merged.meta.kind is PayloadKind.MERGED
    assert merged.meta.config["num_classes"] == 9
    assert not any(
        "lora" in name or "base_layer" in name or "modules_to_save" in name for name in merged.tensors
    )

    plain = plain_vit()
    plain.load_state_dict(dict(merged.tensors), strict=True)
    peft_model = build_model(spec)
    peft_model.load_exchanged(_next_global(store))
    batch = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_model.module.eval()(batch)
        actual = plain.eval()(batch)
        untouched = build_model(spec).module.eval()(batch)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-3)  # the update changed the model
    best = plain_vit()
    best.load_state_dict(dict(decode(store.get_bytes(LAYOUT.best_merged_model())).tensors), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(best.eval()(batch), untouched, rtol=1e-5, atol=1e-5)

    identity = _file_identity(store, LAYOUT.merged_model())
    assert aggregator.merge(1, best_round=0) == reply
    assert _file_identity(store, LAYOUT.merged_model()) == identity
    with pytest.raises(UnknownRoundError, match="best round 2 comes after the final round 1"):
        aggregator.merge(1, best_round=2)


def test_an_update_carrying_a_personal_tensor_is_rejected_naming_it(store: LocalStore) -> None:
    spec = _spec(sites=["fab-a", "fab-b"], lora_rank=4).model_copy(
        update={"exchange": ExchangeSpec(policy=ExchangePolicy.EXCLUDE, layers=["head.*"])}
    )
    model = build_model(spec)
    head = "base_model.model.head.modules_to_save.default.weight"
    assert head in model.personal_names()
    aggregator = RoundAggregator(store, LAYOUT, spec)
    aggregator.initialize()
    initial = decode(store.get_bytes(LAYOUT.global_model(0)))
    assert sorted(initial.tensors) == model.exchanged_names(), "the global model holds shared tensors only"
    shapes = {name: tuple(tensor.shape) for name, tensor in initial.tensors.items()}
    shared = _random(shapes, seed=3, scale=0.01)
    leaking = {**shared, head: torch.zeros(9, 32)}
    fingerprint = initial.meta.base_fingerprint
    store.put_bytes(LAYOUT.update(0, "fab-a"), _update_bytes("fab-a", shared, 30, fingerprint=fingerprint))
    store.put_bytes(LAYOUT.update(0, "fab-b"), _update_bytes("fab-b", leaking, 30, fingerprint=fingerprint))
    assert aggregator.submit(0, "fab-a").accepted
    verdict = aggregator.submit(0, "fab-b")
    assert (verdict.accepted, verdict.reason) == (False, "names")
    assert f"unknown tensors: {head}" in (verdict.message or "")
    aggregator.close(0, ["fab-a"])

    # The merged global model's personal layers are the initial ones: no site sent its own.
    aggregator.merge(1)
    merged = decode(store.get_bytes(LAYOUT.merged_model()))
    initial_head = model.personal_state()[head]
    assert torch.equal(merged.tensors["head.weight"], initial_head)


def test_merge_refuses_a_model_from_another_base(store: LocalStore) -> None:
    spec = _spec(sites=["fab-a"], lora_rank=4)
    exchanged = build_model(spec).exchanged_state()
    _write_global(store, exchanged, fingerprint="ab" * 32)
    with pytest.raises(AggregationError, match="different base model"):
        RoundAggregator(store, LAYOUT, spec).merge(0)
    assert not store.exists(LAYOUT.merged_model())


# --------------------------------------------------------------------------------------------------
# strategies


def test_the_accumulator_holds_one_fp32_tensor_per_name() -> None:
    accumulator = WeightedMean(SHAPES)
    held = dict(accumulator._sum)
    for index, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3):
        delta = {name: tensor.to(dtype) for name, tensor in _random(SHAPES, seed=index, scale=0.1).items()}
        accumulator.add(delta, weight=index + 1.0)
        assert sorted(accumulator._sum) == sorted(SHAPES)
        for name, running in accumulator._sum.items():
            assert running is held[name]  # summed in place, never reallocated
            assert running.dtype == torch.float32
            assert tuple(running.shape) == SHAPES[name]
    assert accumulator.updates == 9
    assert accumulator.total_weight == pytest.approx(45.0)
    assert sorted(accumulator.result()) == sorted(SHAPES)


def test_weighted_mean_matches_numpy_and_needs_an_update() -> None:
    accumulator = WeightedMean(SHAPES)
    with pytest.raises(ValueError, match="no update was added"):
        accumulator.result()
    deltas = [_random(SHAPES, seed=seed) for seed in range(3)]
    weights = [3.0, 0.5, 7.25]
    for delta, weight in zip(deltas, weights, strict=True):
        accumulator.add(delta, weight)
    result = accumulator.result()
    for name in SHAPES:
        expected = sum(w * d[name].double().numpy() for d, w in zip(deltas, weights, strict=True)) / sum(
            weights
        )
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_weighted_mean_refuses_a_bad_weight(weight: float) -> None:
    accumulator = WeightedMean(SHAPES)
    with pytest.raises(ValueError, match="positive finite"):
        accumulator.add(_random(SHAPES, seed=0), weight)
    assert accumulator.updates == 0


def test_site_weight() -> None:
    assert site_weight(Weighting.SAMPLES, 120, None) == 120.0
    assert site_weight(Weighting.SAMPLES, 120, 3.0) == 120.0
    assert site_weight(Weighting.UNIFORM, 0, None) == 1.0
    assert site_weight(Weighting.EXPLICIT, 0, 2.5) == 2.5
    for samples in (0, -3):
        with pytest.raises(ValueError, match=f"positive sample count, got {samples}"):
            site_weight(Weighting.SAMPLES, samples, None)
    for explicit in (None, 0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="weighting is explicit"):
            site_weight(Weighting.EXPLICIT, 100, explicit)


def test_fedavg_applies_the_aggregate_in_fp32() -> None:
    strategy = make_strategy(StrategyName.FEDAVG)
    assert isinstance(strategy, FedAvg)
    current = {"w": torch.ones(3, dtype=torch.bfloat16)}
    result = strategy.apply(current, {"w": torch.tensor([0.5, -1.0, 1e-4])})
    assert result["w"].dtype == torch.float32
    torch.testing.assert_close(result["w"], torch.tensor([1.5, 0.0, 1.0001]))


def test_a_round_whose_aggregate_overflows_publishes_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    _write_global(store, {"w": torch.zeros(4)})
    huge = {"w": torch.full((4,), 3.0e38)}
    for site in ("fab-a", "fab-b"):
        store.put_bytes(LAYOUT.update(0, site), _update_bytes(site, huge, 10))
        assert aggregator.submit(0, site).accepted, "each update alone is finite"
    with pytest.raises(AggregationError, match="not finite"):
        aggregator.close(0, ["fab-a", "fab-b"])
    assert not store.exists(LAYOUT.global_model(1))
    assert not store.exists(LAYOUT.manifest(0))


def test_a_rejection_reads_only_its_own_update_and_the_close_rebuilds_once(
    tmp_path: Path, global_tensors: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    # A NaN in the last tensor is found after the others were folded: the round is tainted, not
    # rebuilt at once, so hostile sites cannot make every rejection re-read the accepted updates.
    store = RecordingStore(tmp_path / "store")
    _prepare(store, global_tensors, deltas)
    bad = ["nan-1", "nan-2", "nan-3"]
    for site in bad:
        poisoned = {name: tensor.clone() for name, tensor in deltas["fab-a"].items()}
        poisoned["pos_embed"].view(-1)[0] = math.nan
        store.put_bytes(LAYOUT.update(0, site), _update_bytes(site, poisoned, 10))
    aggregator = RoundAggregator(store, LAYOUT, _spec(sites=[*SITES, *bad]))
    for site in SITES:
        assert aggregator.submit(0, site).accepted
    reads = len(store.read)
    for site in bad:
        assert aggregator.submit(0, site).reason == "nonfinite"
    assert store.read[reads:] == [LAYOUT.update(0, site) for site in bad]
    aggregator.close(0, list(SITES))
    assert all(store.read.count(LAYOUT.update(0, site)) == 2 for site in SITES)
    _assert_model(_next_global(store), _numpy_fedavg(global_tensors, deltas, SAMPLES))
