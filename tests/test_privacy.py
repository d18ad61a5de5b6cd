"""privacy.clipNorm and privacy.dp through the real parts: the trainer clips its update, the aggregator
clips again what rounding pushed over and adds calibrated noise, and the engine accounts epsilon after
each round (against a direct dp-accounting computation) and stops before the budget."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from jobs import in_process_job, tiny_spec
from test_engine import World, make_spec

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import CLIP_BELOW_METRIC, CLIP_CONFIG_KEY, ConditionType, FederatedTrainingSpec, Phase
from fedtrain.codec import Metadata, PayloadKind, decode, encode, l2_norm
from fedtrain.layout import TrainingLayout
from fedtrain.operator.selection import select_sites
from fedtrain.store import LocalStore
from fedtrain.trainer.train import run_job

LAYOUT = TrainingLayout(namespace="lab", name="wafers")
BASE = "0f" * 32
SHAPES = {"w": (400, 500), "b": (500,)}


def _spec(privacy: dict[str, Any], sites: int = 2, **extra: Any) -> FederatedTrainingSpec:
    document: dict[str, Any] = {
        "model": {"numClasses": 9},
        "aggregation": {"weighting": "uniform", "minSites": 1},
        "privacy": privacy,
        "sites": [{"name": f"fab-{i}", "data": {"synthetic": {"samples": 400}}} for i in range(sites)],
    }
    for key, value in extra.items():
        document[key] = {**document.get(key, {}), **value}
    return FederatedTrainingSpec.model_validate(document, by_name=False)


def _round_zero(
    store: LocalStore, start: dict[str, torch.Tensor], deltas: dict[str, dict[str, torch.Tensor]]
) -> None:
    meta = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(start, meta))
    for site, delta in deltas.items():
        update = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=0,
            site=site,
            samples=100,
            base_fingerprint=BASE,
            timings={"train_seconds": 1.0},
            metrics={CLIP_BELOW_METRIC: 1.0 if l2_norm(delta) <= 1.0 else 0.0},
        )
        store.put_bytes(LAYOUT.update(0, site), encode(delta, update))


def _random(seed: int, norm: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    factor = norm / l2_norm(tensors)
    return {name: tensor * factor for name, tensor in tensors.items()}


# --------------------------------------------------------------------------------------------------
# the aggregator


def test_the_aggregator_scales_an_update_above_the_clip_down_to_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    start = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    deltas = {"fab-0": _random(1, 10.0), "fab-1": _random(2, 0.5)}
    _round_zero(store, start, deltas)
    aggregator = RoundAggregator(store, LAYOUT, _spec({"clipNorm": 2.0}))
    verdicts = [aggregator.submit(0, site) for site in deltas]
    assert all(verdict.accepted for verdict in verdicts)
    assert verdicts[0].norm == pytest.approx(10.0, rel=1e-5), "the verdict reports the norm sent"
    aggregator.close(0, list(deltas))
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors
    for name in SHAPES:
        expected = (deltas["fab-0"][name].numpy() * 0.2 + deltas["fab-1"][name].numpy()) / 2
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adaptive", [False, True])
def test_dp_noise_has_the_calibrated_variance_and_the_mean_a_fixed_denominator(
    tmp_path: Path, adaptive: bool
) -> None:
    """sigma 0.8, clip 1.5, 3 sites of which 2 send: the next model is (sum of the two clipped updates
    + N(0, (0.8 x 1.5)^2)) / 3, the number of sites a round selects. With adaptive clipping the count
    of sites within the clip takes its share of the budget (sigma_b = 0.8 by default): the updates
    get sigma_delta = (0.8^-2 - 1.6^-2)^-1/2 instead."""
    store = LocalStore(tmp_path)
    start = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    deltas = {"fab-0": _random(1, 4.0), "fab-1": _random(2, 1.0)}
    _round_zero(store, start, deltas)
    privacy: dict[str, Any] = {"clipNorm": 1.5, "dp": {"noiseMultiplier": 0.8}}
    if adaptive:
        privacy["adaptiveClipping"] = {}
    spec = _spec(privacy, sites=3)
    aggregator = RoundAggregator(store, LAYOUT, spec)
    assert all(aggregator.submit(0, site).accepted for site in deltas)
    aggregator.close(0, list(deltas))
    result = decode(store.get_bytes(LAYOUT.global_model(1))).tensors
    noise = np.concatenate(
        [
            (
                result[name].double().numpy() * 3
                - deltas["fab-0"][name].double().numpy() * (1.5 / 4.0)
                - deltas["fab-1"][name].double().numpy()
            ).ravel()
            for name in SHAPES
        ]
    )
    sigma = (0.8**-2 - 1.6**-2) ** -0.5 if adaptive else 0.8
    count, std = noise.size, sigma * 1.5
    # The sample standard deviation of n normals is within 5 of its standard errors std / sqrt(2n).
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * count)
    assert abs(noise.mean()) < 5 * std / math.sqrt(count)
    again = RoundAggregator(LocalStore(tmp_path / "again"), LAYOUT, spec)
    _round_zero(again.store, start, deltas)  # type: ignore[arg-type]
    for site in deltas:
        again.submit(0, site)
    again.close(0, list(deltas))
    other = decode(again.store.get_bytes(LAYOUT.global_model(1))).tensors
    assert not torch.equal(other["w"], result["w"]), "the noise is drawn afresh, not from a known seed"


def test_adaptive_clipping_moves_the_clip_toward_the_target_quantile(tmp_path: Path) -> None:
    """No dp, so the count is exact: 1 of 3 updates within the clip 1.0 (target quantile 0.5, eta
    0.2) gives the next clip exp(-0.2 (1/3 - 0.5)); the round's updates were held to 1.0, and the
    next round's clip travels in the next global model for its trainers and its aggregator."""
    store = LocalStore(tmp_path)
    start = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    deltas = {"fab-0": _random(1, 3.0), "fab-1": _random(2, 0.5), "fab-2": _random(3, 2.0)}
    _round_zero(store, start, deltas)
    spec = _spec({"clipNorm": 1.0, "adaptiveClipping": {"targetQuantile": 0.5, "learningRate": 0.2}}, sites=3)
    aggregator = RoundAggregator(store, LAYOUT, spec)
    assert all(aggregator.submit(0, site).accepted for site in deltas)
    manifest = aggregator.close(0, list(deltas))
    expected = math.exp(-0.2 * (1 / 3 - 0.5))
    assert manifest.clip_norm == 1.0
    assert manifest.next_clip_norm == pytest.approx(expected)
    next_model = decode(store.get_bytes(LAYOUT.global_model(1)))
    assert next_model.meta.config[CLIP_CONFIG_KEY] == pytest.approx(expected)
    for name in SHAPES:
        held = sum(delta[name].numpy() * min(1.0, 1.0 / l2_norm(delta)) for delta in deltas.values()) / 3
        np.testing.assert_allclose(next_model.tensors[name].numpy(), held, rtol=1e-5, atol=1e-7)
    assert spec.privacy.round_clip(next_model.meta.config) == pytest.approx(expected)


def test_adaptive_clipping_refuses_an_update_without_its_bit(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _round_zero(
        store, {name: torch.zeros(shape) for name, shape in SHAPES.items()}, {"fab-0": _random(1, 1.0)}
    )
    path = store.local_path(LAYOUT.update(0, "fab-0"))
    payload = decode(path.read_bytes())
    meta = payload.meta.model_copy(update={"metrics": {CLIP_BELOW_METRIC: 0.5}})
    path.write_bytes(encode(dict(payload.tensors), meta))
    spec = _spec({"clipNorm": 1.0, "adaptiveClipping": {}}, sites=1)
    verdict = RoundAggregator(store, LAYOUT, spec).submit(0, "fab-0")
    assert (verdict.accepted, verdict.reason) == (False, "metadata")
    assert "clip_below" in (verdict.message or "")


# --------------------------------------------------------------------------------------------------
# the trainer


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_trainer_clips_every_update_it_sends(tmp_path: Path, adaptive: bool) -> None:
    """With adaptive clipping the round's clip is the one its global model carries (0.004 here, not
    clipNorm's 0.01), and the update reports whether the change was within it."""
    privacy: dict[str, Any] = {"clipNorm": 0.01, **({"adaptiveClipping": {}} if adaptive else {})}
    spec = tiny_spec(
        ["fab-a"], training={"rounds": 1, "localSteps": 3, "optimizer": {"lr": 0.05}}, privacy=privacy
    )
    store, layout = LocalStore(tmp_path), TrainingLayout("local", "clip-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    clip = 0.01
    if adaptive:  # the global model of round 0 as an adaptive round would have written it
        clip = 0.004
        initial = decode(store.get_bytes(layout.global_model(0)))
        meta = initial.meta.model_copy(update={"config": {**initial.meta.config, CLIP_CONFIG_KEY: clip}})
        store.put_bytes(layout.global_model(0), encode(dict(initial.tensors), meta))
        aggregator = RoundAggregator(store, layout, spec)
    meta = run_job(in_process_job(store, layout, spec, 0, "fab-a"))
    sent = decode(store.get_bytes(layout.update(0, "fab-a")))
    assert l2_norm(sent.tensors) <= clip * (1 + 1e-6)
    assert meta.metrics["unclipped_norm"] > 0.01, "a learning rate of 0.05 moves it further than 0.01"
    assert meta.metrics["clip_factor"] == pytest.approx(clip / meta.metrics["unclipped_norm"])
    assert (CLIP_BELOW_METRIC in meta.metrics) is adaptive
    assert meta.metrics.get(CLIP_BELOW_METRIC, 0.0) == 0.0
    assert aggregator.submit(0, "fab-a").accepted


# --------------------------------------------------------------------------------------------------
# the engine


def _dp_spec(
    rounds: int, target: float | None, sites: int = 4, site_fraction: float = 1.0
) -> FederatedTrainingSpec:
    base = make_spec(sites, rounds=rounds, site_fraction=site_fraction).to_api()
    base["aggregation"]["weighting"] = "uniform"
    dp: dict[str, Any] = {"noiseMultiplier": 1.1, "delta": 1e-5}
    if target is not None:
        dp["targetEpsilon"] = target
    base["privacy"] = {"clipNorm": 1.0, "dp": dp}
    return FederatedTrainingSpec.model_validate(base)


def _accountant_epsilon(rounds: int) -> float:
    """rounds Gaussian mechanisms of noise multiplier 1.1, composed by dp-accounting's RDP accountant."""
    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(1.1), rounds))
    return float(accountant.get_epsilon(1e-5))


@pytest.mark.parametrize("site_fraction", [1.0, 0.5])
def test_the_status_reports_the_accountants_epsilon_after_each_round(site_fraction: float) -> None:
    """The selection follows from the spec's seed, so no amplification by sampling is claimed: after
    r rounds epsilon is that of the rounds the most-selected site took part in (all with fraction 1)."""
    spec = _dp_spec(4, None, site_fraction=site_fraction)
    world = World(spec, react=True)
    status = world.run()
    assert status.phase is Phase.SUCCEEDED
    trained = [record for record in status.history if record.kind == "train"]
    assert [record.round for record in trained] == [0, 1, 2, 3]
    taken = [Counter(site for r in range(rounds) for site in select_sites(spec, r)) for rounds in range(1, 5)]
    expected = [_accountant_epsilon(max(counts.values())) for counts in taken]
    if site_fraction < 1:
        assert max(taken[-1].values()) < 4, "a sample of half the sites leaves each site out sometimes"
    assert [record.epsilon for record in trained] == pytest.approx(expected, rel=1e-9)
    assert status.privacy_epsilon == pytest.approx(expected[-1], rel=1e-9)
    assert expected == sorted(expected)


def test_the_training_stops_before_a_round_would_exceed_the_budget() -> None:
    budget = (_accountant_epsilon(2) + _accountant_epsilon(3)) / 2  # 2 rounds fit, 3 do not
    world = World(_dp_spec(10, budget), react=True)
    status = world.run()
    assert status.phase is Phase.SUCCEEDED
    assert [(record.round, record.kind) for record in status.history] == [
        (0, "train"),
        (1, "train"),
        (2, "evaluate"),
    ]
    assert status.privacy_epsilon is not None
    assert status.privacy_epsilon <= budget
    condition = next(c for c in status.conditions if c.type is ConditionType.PRIVACY_BUDGET)
    assert (condition.status, condition.reason) == ("True", "BudgetReached")
    assert "2 rounds spent epsilon" in condition.message
    assert "(2 of the 10 rounds fit)" in condition.message


def test_a_budget_no_round_fits_fails_the_training_as_an_invalid_spec() -> None:
    world = World(_dp_spec(3, 0.01), react=True)
    status = world.run()
    assert status.phase is Phase.FAILED
    failed = next(c for c in status.conditions if c.type is ConditionType.INVALID)
    assert "raise noiseMultiplier or targetEpsilon" in failed.message
    assert status.history == []


@pytest.mark.parametrize(
    ("privacy", "extra", "says"),
    [
        ({"dp": {"noiseMultiplier": 1.0}}, {}, "set privacy.clipNorm"),
        (
            {"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.0}},
            {"aggregation": {"weighting": "samples"}},
            "uniform",
        ),
        ({"clipNorm": 1.0}, {"aggregation": {"strategy": "median"}}, "not median"),
        (
            {"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.0}},
            {"exchange": {"policy": "sparse", "topK": 0.1}},
            "exchange policy all, fixed or exclude",
        ),
        (
            {"clipNorm": 1.0, "dp": {"noiseMultiplier": 1.0}},
            {"aggregation": {"controlVariates": "scaffold"}},
            "no aggregation.controlVariates",
        ),
    ],
)
def test_privacy_refuses_what_it_cannot_protect(
    privacy: dict[str, Any], extra: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        _spec(privacy, **extra)
