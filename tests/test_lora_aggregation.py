"""lora.aggregation product through the real aggregator: the next global factors are the truncated
SVD of the weighted mean of the sites' weight changes (numpy), and two real rounds of two sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import in_process_job

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore
from fedtrain.trainer.train import run_job

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
RANK, ALPHA = 2, 4
A = "base_model.model.blocks.0.attn.qkv.lora_A.default.weight"
B = "base_model.model.blocks.0.attn.qkv.lora_B.default.weight"
HEAD = "base_model.model.head.modules_to_save.default.weight"
SHAPES = {A: (RANK, 12), B: (10, RANK), HEAD: (9, 12)}
SAMPLES = {"fab-a": 100, "fab-b": 300, "fab-c": 50}


def _random(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def _spec(**extra: Any) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "lora": {"rank": RANK, "alpha": ALPHA, "aggregation": "product"},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SAMPLES],
            **extra,
        },
        by_name=False,
    )


def test_the_next_factors_are_the_truncated_svd_of_the_mean_weight_change(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    start = _random(0)
    meta = Metadata(
        kind=PayloadKind.MODEL,
        training=LAYOUT.name,
        round=0,
        base_fingerprint=BASE,
        config={"rank": RANK, "alpha": ALPHA},
    )
    store.put_bytes(LAYOUT.global_model(0), encode(start, meta))
    deltas = {site: _random(i + 1, 0.3) for i, site in enumerate(SAMPLES)}
    for site, delta in deltas.items():
        update = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=0,
            site=site,
            samples=SAMPLES[site],
            base_fingerprint=BASE,
            timings={"train_seconds": 1.0},
        )
        store.put_bytes(LAYOUT.update(0, site), encode(delta, update))
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


def test_two_sites_train_two_rounds_with_product_aggregation(tmp_path: Path) -> None:
    spec = FederatedTrainingSpec.model_validate(
        {
            "model": {
                "numClasses": 9,
                "imageSize": 28,
                "architecture": {"depth": 1, "embedDim": 32, "numHeads": 2},
            },
            "lora": {"rank": 4, "aggregation": "product"},
            "training": {"rounds": 2, "localSteps": 2, "batchSize": 8, "seed": 5, "optimizer": {"lr": 0.01}},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 40}}} for site in ("fab-a", "fab-b")],
        },
        by_name=False,
    )
    store, layout = LocalStore(tmp_path), TrainingLayout("local", "product-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    for round_index in range(2):
        for site in ("fab-a", "fab-b"):
            run_job(in_process_job(store, layout, spec, round_index, site))
            assert aggregator.submit(round_index, site).accepted
        manifest = aggregator.close(round_index, ["fab-a", "fab-b"])
        layers = {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
        assert set(manifest.lora_energy) == layers
        assert all(0.5 < energy <= 1.0 + 1e-9 for energy in manifest.lora_energy.values())
    aggregator.merge(2)
    assert store.exists(layout.merged_model())
