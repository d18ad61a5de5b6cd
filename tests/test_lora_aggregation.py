"""lora.aggregation product through the real aggregator: the next global factors are the truncated
SVD of the weighted mean of the sites' weight changes (numpy), with sites of their own lower rank
(sites[].loraRank), and two real rounds of two sites of different ranks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import in_process_job, tiny_spec

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.lora_ranks import shapes_at_rank
from fedtrain.store import LocalStore
from fedtrain.trainer.train import fetch_inputs, run_job

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
RANK, ALPHA = 2, 4
A = "base_model.model.blocks.0.attn.qkv.lora_A.default.weight"
B = "base_model.model.blocks.0.attn.qkv.lora_B.default.weight"
HEAD = "base_model.model.head.modules_to_save.default.weight"
SHAPES = {A: (RANK, 12), B: (10, RANK), HEAD: (9, 12)}
SAMPLES = {"fab-a": 100, "fab-b": 300, "fab-c": 50}


def _random(seed: int, scale: float = 1.0, rank: int = RANK) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = shapes_at_rank(SHAPES, rank)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _spec(site_ranks: dict[str, int] | None = None, **extra: Any) -> FederatedTrainingSpec:
    ranks = site_ranks or {}
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "lora": {"rank": RANK, "alpha": ALPHA, "aggregation": "product"},
            "sites": [
                {"name": site, "data": {"synthetic": {"samples": 400}}}
                | ({"loraRank": ranks[site]} if site in ranks else {})
                for site in SAMPLES
            ],
            **extra,
        },
        by_name=False,
    )


def _update(site: str) -> Metadata:
    return Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=0,
        site=site,
        samples=SAMPLES[site],
        base_fingerprint=BASE,
        timings={"train_seconds": 1.0},
    )


def _initial_model(store: LocalStore) -> dict[str, torch.Tensor]:
    """A random round-0 global model of rank RANK and alpha ALPHA in `store`; its tensors."""
    start = _random(0)
    meta = Metadata(
        kind=PayloadKind.MODEL,
        training=LAYOUT.name,
        round=0,
        base_fingerprint=BASE,
        config={"rank": RANK, "alpha": ALPHA},
    )
    store.put_bytes(LAYOUT.global_model(0), encode(start, meta))
    return start


def test_the_next_factors_are_the_truncated_svd_of_the_mean_weight_change(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    start = _initial_model(store)
    deltas = {site: _random(i + 1, 0.3) for i, site in enumerate(SAMPLES)}
    for site, delta in deltas.items():
        store.put_bytes(LAYOUT.update(0, site), encode(delta, _update(site)))
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    for site in SAMPLES:
        assert aggregator.submit(0, site).accepted
    manifest = aggregator.close(0, list(SAMPLES))
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors

    scale, total = ALPHA / RANK, sum(SAMPLES.values())
    mean = (
        sum(
            SAMPLES[s]
            * scale
            * (start[B] + deltas[s][B]).double().numpy()
            @ (start[A] + deltas[s][A]).double().numpy()
            for s in SAMPLES
        )
        / total
    )
    u, sigma, vh = np.linalg.svd(mean)
    best = (u[:, :RANK] * sigma[:RANK]) @ vh[:RANK]  # Eckart-Young: the best rank-2 approximation
    produced = scale * result[B].double().numpy() @ result[A].double().numpy()
    np.testing.assert_allclose(produced, best, rtol=1e-5, atol=1e-6)
    assert manifest.lora_energy == pytest.approx(
        {"blocks.0.attn.qkv": float((sigma[:RANK] ** 2).sum() / (sigma**2).sum())}
    )
    # Three rank-2 changes sum to rank up to 6: the truncation loses something, naive averaging more.
    naive = (
        scale
        * (start[B] + sum(SAMPLES[s] * deltas[s][B] for s in SAMPLES) / total).double().numpy()
        @ (start[A] + sum(SAMPLES[s] * deltas[s][A] for s in SAMPLES) / total).double().numpy()
    )
    assert np.linalg.norm(produced - mean) < np.linalg.norm(naive - mean)
    # Every other tensor is FedAvg's weighted mean.
    head = (
        start[HEAD].double().numpy()
        + sum(SAMPLES[s] * deltas[s][HEAD].double().numpy() for s in SAMPLES) / total
    )
    np.testing.assert_allclose(result[HEAD].double().numpy(), head, rtol=1e-6, atol=1e-6)


def test_a_site_of_a_lower_rank_is_averaged_as_the_factors_it_received_plus_its_change(
    tmp_path: Path,
) -> None:
    """fab-c runs rank 1 (alpha 4, so scale 4 where the global rank-2 factors have scale 2): it
    received the first component of the global factors times sqrt(2 / 4) each, and its weight change
    is 4 (that + its delta) product; the next global factors are the rank-2 SVD of the weighted mean."""
    store = LocalStore(tmp_path)
    start = _initial_model(store)
    ranks = {"fab-a": RANK, "fab-b": RANK, "fab-c": 1}
    deltas = {site: _random(i + 1, 0.3, ranks[site]) for i, site in enumerate(SAMPLES)}
    aggregator = RoundAggregator(store, LAYOUT, _spec({"fab-c": 1}))
    # Each site must send factors at its own rank: the full rank from fab-c is refused, and the
    # rank-1 update from fab-a too.
    store.put_bytes(LAYOUT.update(0, "fab-c"), encode(_random(9, 0.3), _update("fab-c")))
    refused = aggregator.submit(0, "fab-c")
    assert (refused.accepted, refused.reason) == (False, "shape")
    assert f"expected ({1}, 12)" in (refused.message or "")
    aggregator = RoundAggregator(store, LAYOUT, _spec({"fab-c": 1}))
    store.put_bytes(LAYOUT.update(0, "fab-a"), encode(_random(9, 0.3, 1), _update("fab-a")))
    assert aggregator.submit(0, "fab-a").reason == "shape"

    aggregator = RoundAggregator(store, LAYOUT, _spec({"fab-c": 1}))
    for site, delta in deltas.items():
        store.put_bytes(LAYOUT.update(0, site), encode(delta, _update(site)))
        assert aggregator.submit(0, site).accepted
    manifest = aggregator.close(0, list(SAMPLES))
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors

    def factors(site: str) -> tuple[np.ndarray, np.ndarray, float]:
        rank = ranks[site]
        scale = ALPHA / rank
        received = np.sqrt((ALPHA / RANK) / scale)
        b = received * start[B].double().numpy()[:, :rank] + deltas[site][B].double().numpy()
        a = received * start[A].double().numpy()[:rank] + deltas[site][A].double().numpy()
        return b, a, scale

    total = sum(SAMPLES.values())
    mean = sum(SAMPLES[s] * factors(s)[2] * factors(s)[0] @ factors(s)[1] for s in SAMPLES) / total
    u, sigma, vh = np.linalg.svd(mean)
    best = (u[:, :RANK] * sigma[:RANK]) @ vh[:RANK]
    produced = (ALPHA / RANK) * result[B].double().numpy() @ result[A].double().numpy()
    np.testing.assert_allclose(produced, best, rtol=1e-5, atol=1e-6)
    assert tuple(result[A].shape) == SHAPES[A], "the global model keeps the global rank"
    energy = (sigma**2).cumsum() / (sigma**2).sum()
    assert manifest.lora_energy == pytest.approx({"blocks.0.attn.qkv": float(energy[RANK - 1])})
    assert set(manifest.lora_energy_by_rank) == {"1"}
    assert manifest.lora_energy_by_rank["1"] == pytest.approx({"blocks.0.attn.qkv": float(energy[0])})


@pytest.mark.parametrize(
    ("ranks", "extra", "says"),
    [
        ({"fab-b": 1}, {"lora": {"rank": RANK, "aggregation": "naive"}}, "needs lora.aggregation product"),
        ({"fab-b": 1}, {"lora": {"rank": "auto", "aggregation": "product"}}, "integer lora.rank"),
        ({"fab-b": RANK + 1}, {}, f"sites[1].loraRank {RANK + 1} is above lora.rank {RANK}"),
        ({"fab-c": 1}, {"aggregation": {"controlVariates": "scaffold"}}, "drop aggregation.controlVariates"),
    ],
)
def test_a_site_rank_is_refused_where_it_cannot_work(
    ranks: dict[str, int], extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        _spec(ranks, **extra)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"aggregation": {"strategy": "fedadam"}}, "use aggregation.strategy fedavg"),
        ({"exchange": {"policy": "dynamic", "topFraction": 0.5}}, "sends a part"),
        ({"mode": "localOnly"}, "mode localOnly"),
    ],
)
def test_product_refuses_what_would_undo_it(extra: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        _spec(**extra)


def test_two_sites_of_different_ranks_train_two_rounds_with_product_aggregation(tmp_path: Path) -> None:
    """fab-a at the global rank 4, fab-b at its own rank 2 (alpha 8: scales 2 and 4): fab-b's trainer
    starts from the global factors' first two components times sqrt(2 / 4), and sends rank-2 factors."""
    spec = tiny_spec(
        ["fab-a", {"name": "fab-b", "loraRank": 2, "data": {"synthetic": {"samples": 40}}}],
        lora={"alpha": 8, "aggregation": "product"},
        training={"optimizer": {"lr": 0.01}},
    )
    store, layout = LocalStore(tmp_path), TrainingLayout("local", "product-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    layers = {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    for round_index in range(2):
        global_tensors = decode(store.get_bytes(layout.global_model(round_index))).tensors
        job = in_process_job(store, layout, spec, round_index, "fab-b")
        received = fetch_inputs(job, torch.device("cpu")).model.exchanged_state()
        for a_name in (name for name in global_tensors if ".lora_A." in name):
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            factor = np.sqrt((8 / 4) / (8 / 2))
            np.testing.assert_allclose(received[a_name].numpy(), factor * global_tensors[a_name].numpy()[:2])
            np.testing.assert_allclose(
                received[b_name].numpy(), factor * global_tensors[b_name].numpy()[:, :2]
            )
        for site in ("fab-a", "fab-b"):
            run_job(in_process_job(store, layout, spec, round_index, site))
            assert aggregator.submit(round_index, site).accepted
        sent = decode(store.get_bytes(layout.update(round_index, "fab-b"))).shapes
        assert {shape[0] for name, shape in sent.items() if ".lora_A." in name} == {2}
        manifest = aggregator.close(round_index, ["fab-a", "fab-b"])
        assert set(manifest.lora_energy) == layers
        assert all(0.5 < energy <= 1.0 + 1e-9 for energy in manifest.lora_energy.values())
        by_rank = manifest.lora_energy_by_rank["2"]
        assert set(by_rank) == layers
        assert all(0 < by_rank[layer] <= manifest.lora_energy[layer] + 1e-9 for layer in layers)
    aggregator.merge(2)
    assert store.exists(layout.merged_model())
