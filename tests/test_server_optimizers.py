"""Server optimizers (fedavgm, fedadagrad, fedadam, fedyogi) against numpy, through the real aggregator.

The definitions are written out here in numpy, float64, straight from Reddi et al. 2021 (Algorithm 2)
and Hsu et al. 2019; the aggregator's result must match them over several rounds, with weighted,
partial (exchange policy dynamic) and bf16 updates, and its state must make a restarted aggregator
and a repeated close give the same next model, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.aggregator.strategies import make_strategy
from fedtrain.api import FederatedTrainingSpec, StrategyName, TransferDtype
from fedtrain.codec import Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")
SHAPES = {"head.bias": (9,), "head.weight": (9, 16), "blocks.0.norm1.weight": (16,)}
SAMPLES = {"fab-a": 120, "fab-b": 45, "fab-c": 300}
SETTINGS = {"learningRate": 0.3, "momentum": 0.8, "beta1": 0.85, "beta2": 0.95, "tau": 0.01}
OPTIMIZERS = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]


def numpy_step(
    strategy: str, x: np.ndarray, delta: np.ndarray, state: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One server step, written from the papers' definitions."""
    eta, tau = SETTINGS["learningRate"], SETTINGS["tau"]
    if strategy == "fedavgm":
        m = SETTINGS["momentum"] * state.get("m", np.zeros_like(delta)) + delta
        return x + eta * m, {"m": m}
    b1, b2 = SETTINGS["beta1"], SETTINGS["beta2"]
    m = b1 * state.get("m", np.zeros_like(delta)) + (1 - b1) * delta
    v = state.get("v", np.full_like(delta, tau**2))
    if strategy == "fedadagrad":
        v = v + delta**2
    elif strategy == "fedadam":
        v = b2 * v + (1 - b2) * delta**2
    else:
        v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
    return x + eta * m / (np.sqrt(v) + tau), {"m": m, "v": v}


def spec(strategy: str, **extra: Any) -> FederatedTrainingSpec:
    server = {k: v for k, v in SETTINGS.items() if k in ("learningRate", "momentum", "beta1", "beta2", "tau")}
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "aggregation": {"strategy": strategy, "server": server},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SAMPLES],
            **extra,
        },
        by_name=False,
    )


def _random(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("strategy", OPTIMIZERS)
def test_each_step_equals_the_papers_definition_over_four_rounds(strategy: str) -> None:
    optimizer = make_strategy(StrategyName(strategy), spec(strategy).aggregation)
    x = _random(0)
    expected = {name: t.double().numpy() for name, t in x.items()}
    state: dict[str, torch.Tensor] = {}
    np_state: dict[str, dict[str, np.ndarray]] = {name: {} for name in SHAPES}
    for round_index in range(4):
        delta = _random(round_index + 1, scale=0.05)
        if round_index == 2:
            delta["head.bias"].zero_()  # a tensor nobody sent: it still moves by its momentum
        x, state = optimizer.step(x, {n: t.clone() for n, t in delta.items()}, state)
        for name in SHAPES:
            expected[name], np_state[name] = numpy_step(
                strategy, expected[name], delta[name].double().numpy(), np_state[name]
            )
            np.testing.assert_allclose(x[name].numpy(), expected[name], rtol=2e-5, atol=1e-6)
    assert set(state) == {f"{key}.{name}" for name in SHAPES for key in np_state[next(iter(SHAPES))]}


def test_the_manifest_records_the_strategy_and_its_settings(tmp_path: Path) -> None:
    store, aggregator = _round_zero(tmp_path, "fedyogi")
    manifest = aggregator.close(0, list(SAMPLES))
    assert manifest.strategy == "fedyogi"
    assert manifest.strategy_parameters == {"learningRate": 0.3, "beta1": 0.85, "beta2": 0.95, "tau": 0.01}
    assert manifest.server_state_key == LAYOUT.server_state(0)
    assert store.exists(LAYOUT.server_state(0))
    avgm = make_strategy(StrategyName.FEDAVGM, spec("fedavgm").aggregation)
    assert avgm.parameters() == {"learningRate": 0.3, "momentum": 0.8}
    assert make_strategy(StrategyName.FEDADAM).parameters()["learningRate"] == 0.1  # the default


def _write_round(
    store: LocalStore, round_index: int, updates: dict[str, dict[str, torch.Tensor]], dtype: TransferDtype
) -> None:
    for site, update in updates.items():
        meta = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=round_index,
            site=site,
            samples=SAMPLES[site],
            transfer_dtype=dtype,
            base_fingerprint=BASE,
            timings={"train_seconds": 1.0},
        )
        store.put_bytes(LAYOUT.update(round_index, site), encode(update, meta))


def _round_zero(tmp_path: Path, strategy: str, **extra: Any) -> tuple[LocalStore, RoundAggregator]:
    store = LocalStore(tmp_path)
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), meta))
    _write_round(store, 0, {site: _random(i + 1, 0.05) for i, site in enumerate(SAMPLES)}, TransferDtype.FP32)
    aggregator = RoundAggregator(store, LAYOUT, spec(strategy, **extra))
    for site in SAMPLES:
        assert aggregator.submit(0, site).accepted
    return store, aggregator


def _updates(round_index: int) -> dict[str, dict[str, torch.Tensor]]:
    """Partial bf16-representable updates: fab-b never sends the head's weight."""
    updates = {}
    for index, site in enumerate(SAMPLES):
        delta = _random(10 * round_index + index + 1, 0.05)
        if site == "fab-b":
            delta.pop("head.weight")
        updates[site] = {name: t.to(torch.bfloat16).float() for name, t in delta.items()}
    return updates


def _run(
    tmp_path: Path, strategy: str, rounds: int, restart_after: int | None
) -> tuple[LocalStore, list[dict[str, np.ndarray]]]:
    """`rounds` rounds of partial bf16 updates; a new aggregator (a restart) after `restart_after`."""
    store = LocalStore(tmp_path)
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), meta))
    training = spec(
        strategy, exchange={"policy": "dynamic", "threshold": 0.01}, training={"transferDtype": "bf16"}
    )
    aggregator = RoundAggregator(store, LAYOUT, training)
    for round_index in range(rounds):
        _write_round(store, round_index, _updates(round_index), TransferDtype.BF16)
        for site in SAMPLES:
            verdict = aggregator.submit(round_index, site)
            assert verdict.accepted, verdict.message
        aggregator.close(round_index, list(SAMPLES))
        if round_index == restart_after:
            aggregator = RoundAggregator(store, LAYOUT, training)
    keys = [LAYOUT.global_model(0)] + [LAYOUT.exact_global_model(r) for r in range(1, rounds + 1)]
    models = [
        {n: t.double().numpy() for n, t in decode(store.get_bytes(key)).tensors.items()} for key in keys
    ]
    return store, models


@pytest.mark.parametrize("strategy", OPTIMIZERS)
def test_weighted_partial_bf16_rounds_equal_numpy(tmp_path: Path, strategy: str) -> None:
    _, models = _run(tmp_path, strategy, rounds=3, restart_after=None)
    expected = models[0]
    states: dict[str, dict[str, np.ndarray]] = {name: {} for name in SHAPES}
    for round_index in range(3):
        updates = _updates(round_index)
        for name in SHAPES:
            senders = [site for site in SAMPLES if name in updates[site]]
            weights = np.array([SAMPLES[s] for s in senders], np.float64)
            mean = sum(w * updates[s][name].double().numpy() for w, s in zip(weights, senders, strict=True))
            expected[name], states[name] = numpy_step(
                strategy, expected[name], mean / weights.sum(), states[name]
            )
            np.testing.assert_allclose(models[round_index + 1][name], expected[name], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_a_restarted_aggregator_and_a_repeated_close_give_the_same_model_bit_for_bit(
    tmp_path: Path, strategy: str
) -> None:
    straight, _ = _run(tmp_path / "straight", strategy, rounds=3, restart_after=None)
    restarted, _ = _run(tmp_path / "restarted", strategy, rounds=3, restart_after=0)

    def digest(store: LocalStore, key: str) -> str:  # of every tensor's bytes (the file also holds a time)
        return decode(store.get_bytes(key)).meta.tensors_sha256

    for round_index in range(1, 4):
        key = LAYOUT.exact_global_model(round_index)
        assert digest(straight, key) == digest(restarted, key), f"round {round_index} differs"
    # A close repeated after the model and state were written but before the manifest was (a crash).
    model_before = digest(restarted, LAYOUT.exact_global_model(3))
    state_before = decode(restarted.get_bytes(LAYOUT.server_state(2))).tensors
    (tmp_path / "restarted" / LAYOUT.manifest(2)).unlink()
    again = RoundAggregator(
        restarted,
        LAYOUT,
        spec(strategy, exchange={"policy": "dynamic", "threshold": 0.01}, training={"transferDtype": "bf16"}),
    )
    for site in SAMPLES:
        assert again.submit(2, site).accepted
    again.close(2, list(SAMPLES))
    assert digest(restarted, LAYOUT.exact_global_model(3)) == model_before
    state_after = decode(restarted.get_bytes(LAYOUT.server_state(2))).tensors
    assert all(torch.equal(state_after[n], state_before[n]) for n in state_before)
    assert set(state_after) == set(state_before)
