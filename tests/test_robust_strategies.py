"""Robust strategies through the real aggregator: each against numpy, what the manifest says, what a
replaced update does, and Krum against sign-flipped sites."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtrain.aggregator.robust_strategies import Krum, Median
from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.stored_round import StoredRound
from fedtrain.api import FederatedTrainingSpec, RobustSpec, TransferDtype
from fedtrain.codec import Metadata, PayloadKind, Signature, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
SHAPES = {"head.bias": (9,), "head.weight": (9, 16), "blocks.0.norm1.weight": (16,)}
SITES = [f"fab-{letter}" for letter in "abcdefg"]
SAMPLES = {site: 50 + 40 * index for index, site in enumerate(SITES)}  # unequal: robust ignores them


def _random(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _spec(aggregation: dict[str, Any], sites: list[str], **extra: Any) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "aggregation": aggregation,
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in sites],
            **extra,
        },
        by_name=False,
    )


def _round(
    tmp_path: Path,
    spec: FederatedTrainingSpec,
    updates: dict[str, dict[str, torch.Tensor]],
    dtype: TransferDtype = TransferDtype.FP32,
) -> tuple[LocalStore, RoundAggregator, dict[str, np.ndarray]]:
    """Round 0 with these updates, submitted and closed; the next model's fp32 tensors."""
    store = LocalStore(tmp_path)
    model_meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), model_meta))
    for site, update in updates.items():
        meta = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=0,
            site=site,
            samples=SAMPLES[site],
            transfer_dtype=dtype,
            base_fingerprint=BASE,
            timings={"train_seconds": 1.0},
        )
        store.put_bytes(LAYOUT.update(0, site), encode(update, meta))
    aggregator = RoundAggregator(store, LAYOUT, spec)
    for site in updates:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    return store, aggregator, {}


def _next_model(store: LocalStore, dtype: TransferDtype = TransferDtype.FP32) -> dict[str, np.ndarray]:
    key = LAYOUT.global_model(1) if dtype is TransferDtype.FP32 else LAYOUT.exact_global_model(1)
    return {name: t.double().numpy() for name, t in decode(store.get_bytes(key)).tensors.items()}


def _start() -> dict[str, np.ndarray]:
    return {name: t.double().numpy() for name, t in _random(0).items()}


def test_median_of_bf16_updates_is_numpys_median_unweighted(tmp_path: Path) -> None:
    sites = SITES[:6]  # an even count: the mean of the two middle values
    updates = {
        s: {n: t.to(torch.bfloat16).float() for n, t in _random(i + 1, 0.1).items()}
        for i, s in enumerate(sites)
    }
    spec = _spec({"strategy": "median"}, sites, training={"transferDtype": "bf16"})
    store, aggregator, _ = _round(tmp_path, spec, updates, TransferDtype.BF16)
    manifest = aggregator.close(0, sites)
    assert manifest.strategy == "median"
    result, start = _next_model(store, TransferDtype.BF16), _start()
    for name in SHAPES:
        stacked = np.stack([updates[s][name].double().numpy() for s in sites])
        np.testing.assert_allclose(
            result[name], start[name] + np.median(stacked, axis=0), rtol=1e-6, atol=1e-7
        )


def test_trimmed_mean_of_partial_updates_trims_each_coordinate_over_its_senders(tmp_path: Path) -> None:
    updates = {s: _random(i + 1, 0.1) for i, s in enumerate(SITES)}
    updates["fab-g"] = {n: t * 50 for n, t in updates["fab-g"].items()}  # an outlier everywhere
    del updates["fab-b"]["head.weight"]  # fab-b did not send it (exchange policy dynamic)
    spec = _spec(
        {"strategy": "trimmedMean", "robust": {"trimFraction": 0.2}},
        SITES,
        exchange={"policy": "dynamic", "threshold": 0.01},
    )
    store, aggregator, _ = _round(tmp_path, spec, updates)
    manifest = aggregator.close(0, SITES)
    result, start = _next_model(store), _start()
    for name in SHAPES:
        senders = [s for s in SITES if name in updates[s]]
        stacked = np.sort(np.stack([updates[s][name].double().numpy() for s in senders]), axis=0)
        cut = int(np.floor(0.2 * len(senders)))  # 7 senders: 1 per side; 6 senders: 1 per side
        expected = stacked[cut : len(senders) - cut].mean(axis=0)
        np.testing.assert_allclose(result[name], start[name] + expected, rtol=1e-6, atol=1e-7)
    assert manifest.strategy_parameters == {"trimFraction": 0.2}
    assert manifest.trimmed_share["fab-g"] > 0.9, "the outlier was trimmed at (nearly) every coordinate"
    assert max(share for site, share in manifest.trimmed_share.items() if site != "fab-g") < 0.5


@pytest.mark.parametrize("strategy", ["krum", "multiKrum"])
def test_krum_leaves_out_sign_flipped_sites(tmp_path: Path, strategy: str) -> None:
    honest = torch.Generator().manual_seed(7)
    direction = {n: 0.1 * torch.randn(shape, generator=honest) for n, shape in SHAPES.items()}
    updates = {
        s: {n: d + 0.01 * torch.randn(d.shape, generator=honest) for n, d in direction.items()} for s in SITES
    }
    for bad in ("fab-c", "fab-f"):
        updates[bad] = {n: -5 * t for n, t in updates[bad].items()}
    spec = _spec({"strategy": strategy, "minSites": 7, "robust": {"byzantine": 2}}, SITES)
    store, aggregator, _ = _round(tmp_path, spec, updates)
    manifest = aggregator.close(0, SITES)
    result, start = _next_model(store), _start()
    assert {"fab-c", "fab-f"} <= set(manifest.not_selected)
    chosen = [s for s in SITES if s not in manifest.not_selected]
    assert len(chosen) == (1 if strategy == "krum" else len(SITES) - 2)
    for name in SHAPES:
        mean = np.mean([updates[s][name].double().numpy() for s in chosen], axis=0)
        np.testing.assert_allclose(result[name], start[name] + mean, rtol=1e-6, atol=1e-7)
    assert manifest.strategy_parameters["byzantine"] == 2


def test_an_update_replaced_after_it_was_accepted_is_left_out_at_close(tmp_path: Path) -> None:
    sites = SITES[:5]
    updates = {s: _random(i + 1, 0.1) for i, s in enumerate(sites)}
    store, aggregator, _ = _round(tmp_path, _spec({"strategy": "median"}, sites), updates)
    forged = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=0,
        site="fab-b",
        samples=10,
        base_fingerprint=BASE,
    )
    store.put_bytes(LAYOUT.update(0, "fab-b"), encode(_random(99, 100.0), forged))
    manifest = aggregator.close(0, sites)
    assert [r.site for r in manifest.rejected] == ["fab-b"]
    assert "replaced" in manifest.rejected[0].reason
    result, start = _next_model(store), _start()
    kept = [s for s in sites if s != "fab-b"]
    for name in SHAPES:
        median = np.median(np.stack([updates[s][name].double().numpy() for s in kept]), axis=0)
        np.testing.assert_allclose(result[name], start[name] + median, rtol=1e-6, atol=1e-7)


def test_a_restarted_aggregator_closes_a_robust_round_from_the_store(tmp_path: Path) -> None:
    sites = SITES[:5]
    updates = {s: _random(i + 1, 0.1) for i, s in enumerate(sites)}
    spec = _spec({"strategy": "trimmedMean"}, sites)
    store, _, _ = _round(tmp_path, spec, updates)
    manifest = RoundAggregator(store, LAYOUT, spec).close(0, sites)  # a fresh one: nothing in memory
    assert [p.site for p in manifest.participants] == sites
    result, start = _next_model(store), _start()
    assert manifest.strategy_parameters == {"trimFraction": 0.2}  # the default: one of 5 at each end
    for name in SHAPES:
        stacked = np.sort(np.stack([updates[s][name].double().numpy() for s in sites]), axis=0)
        np.testing.assert_allclose(
            result[name], start[name] + stacked[1:4].mean(axis=0), rtol=1e-6, atol=1e-7
        )


def _stored_round(updates: dict[str, dict[str, torch.Tensor]]) -> StoredRound:
    payloads = {}
    for site, update in updates.items():
        meta = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=0,
            site=site,
            samples=10,
            base_fingerprint=BASE,
        )
        payloads[site] = decode(encode(update, meta))
    return StoredRound(payloads, Signature(shapes=dict(SHAPES), base_fingerprint=BASE))


def test_every_stack_of_a_round_is_a_view_of_one_buffer_of_sites_by_largest_tensor() -> None:
    updates = {s: _random(i + 1) for i, s in enumerate(SITES[:4])}
    del updates["fab-b"]["head.weight"]
    stored = _stored_round(updates)
    senders, weights = stored.stack("head.weight")
    assert senders == ["fab-a", "fab-c", "fab-d"]
    assert torch.equal(weights, torch.stack([updates[s]["head.weight"] for s in senders]))
    pointer = weights.data_ptr()
    senders, everyone = stored.stack("head.weight", zeros=True)  # krum's distances: zeros for fab-b
    assert everyone.data_ptr() == pointer
    assert everyone.shape == (4, 9, 16)
    assert not everyone[1].any()
    assert torch.equal(everyone[2], updates["fab-c"]["head.weight"])
    senders, chosen = stored.stack("head.bias", among={"fab-d", "fab-b"})  # krum's chosen, read again
    assert senders == ["fab-b", "fab-d"]
    assert chosen.data_ptr() == pointer
    assert torch.equal(chosen[1], updates["fab-d"]["head.bias"])
    largest = max(math.prod(shape) for shape in SHAPES.values())
    assert weights.untyped_storage().nbytes() == 4 * largest * 4  # sites x the largest tensor, fp32


def test_a_robust_aggregate_is_views_of_one_fp32_block() -> None:
    updates = {s: _random(i + 1) for i, s in enumerate(SITES[:5])}
    for strategy in (Median(RobustSpec()), Krum(RobustSpec(byzantine=1))):
        outcome = strategy.combine(_stored_round(updates), sorted(SHAPES))
        storages = {tensor.untyped_storage().data_ptr() for tensor in outcome.delta.values()}
        assert len(storages) == 1, "the aggregate's tensors are views of one block"
        assert (
            sum(t.numel() for t in outcome.delta.values()) * 4
            == next(iter(outcome.delta.values())).untyped_storage().nbytes()
        )
