"""SCAFFOLD: the drift correction on a quadratic whose answer is known, the aggregator's control
update against numpy, and two real rounds of two sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jobs import in_process_job, state_key, tiny_spec
from torch import nn

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import CONTROL_SUFFIX, Metadata, PayloadKind, decode, encode
from fedtrain.layout import TrainingLayout
from fedtrain.store import LocalStore
from fedtrain.trainer.scaffold import CONTROL_PREFIX, control_variates
from fedtrain.trainer.train import run_job

BASE = "0f" * 32
LAYOUT = TrainingLayout(namespace="lab", name="wafers")


# --------------------------------------------------------------------------------------------------
# the quadratic: f_i(w) = 1/2 ||w - a_i||², whose federated optimum is the mean of the a_i


def _local_sgd(
    start: torch.Tensor,
    target: torch.Tensor,
    lr: float,
    steps: int,
    server: torch.Tensor | None,
    own: torch.Tensor | None,
) -> tuple[torch.Tensor, Any]:
    weight = nn.Parameter(start.clone())
    optimizer = torch.optim.SGD([weight], lr=lr)
    control = None
    if server is not None and own is not None:
        control = control_variates({"w": weight}, ["w"], {"w": server}, {"w": own})
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * (weight - target).square().sum()).backward()
        if control is not None:
            control.correct(lr)
        optimizer.step()
    return weight.detach().clone(), control


def test_with_the_right_control_variates_local_training_does_not_drift_from_the_optimum() -> None:
    targets = [torch.tensor([4.0, -2.0]), torch.tensor([-2.0, 6.0]), torch.tensor([4.0, 2.0])]
    optimum = torch.stack(targets).mean(dim=0)  # the minimiser of the sum of the f_i
    server = torch.zeros(2)  # c = the mean of the c_i = the gradient of the sum at the optimum: 0
    for target in targets:
        drifted, _ = _local_sgd(optimum, target, lr=0.1, steps=10, server=None, own=None)
        assert float((drifted - optimum).norm()) > 1.0, "plain local SGD walks towards its own target"
        own = optimum - target  # c_i = grad f_i at the optimum
        stayed, control = _local_sgd(optimum, target, lr=0.1, steps=10, server=server, own=own)
        torch.testing.assert_close(stayed, optimum)  # the corrected gradient is zero there
        changes, updated = control.finish({"w": optimum}, {"w": stayed})
        torch.testing.assert_close(updated["w"], own)  # option II keeps the right variate
        torch.testing.assert_close(changes["w"], torch.zeros(2))


def test_option_two_equals_its_numpy_definition_with_a_varying_learning_rate() -> None:
    start, target = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0.0, 3.0, 2.0])
    server, own = torch.tensor([0.2, -0.1, 0.05]), torch.tensor([-0.3, 0.4, 0.0])
    weight = nn.Parameter(start.clone())
    control = control_variates({"w": weight}, ["w"], {"w": server}, {"w": own})
    rates = [0.1, 0.05, 0.2, 0.1]
    w = start.double().numpy()
    for lr in rates:
        weight.grad = (weight.detach() - target).clone()
        control.correct(lr)
        with torch.no_grad():
            weight -= lr * weight.grad
        w = w - lr * ((w - target.double().numpy()) - own.double().numpy() + server.double().numpy())
    np.testing.assert_allclose(weight.detach().double().numpy(), w, rtol=1e-6)
    changes, updated = control.finish({"w": start}, {"w": weight.detach()})
    expected = own.double().numpy() - server.double().numpy() + (start.double().numpy() - w) / sum(rates)
    np.testing.assert_allclose(updated["w"].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        changes["w"].double().numpy(), expected - own.double().numpy(), rtol=1e-5, atol=1e-6
    )


# --------------------------------------------------------------------------------------------------
# the aggregator


SHAPES = {"head.bias": (9,), "head.weight": (9, 16)}
SAMPLES = {"fab-a": 100, "fab-b": 300, "fab-c": 50, "fab-d": 60}


def _spec(**extra: Any) -> FederatedTrainingSpec:
    return FederatedTrainingSpec.model_validate(
        {
            "model": {"numClasses": 9},
            "aggregation": {"controlVariates": "scaffold"},
            "sites": [{"name": site, "data": {"synthetic": {"samples": 400}}} for site in SAMPLES],
            **extra,
        },
        by_name=False,
    )


def _random(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def test_the_server_variate_moves_by_the_mean_change_times_the_share_of_sites(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), model))
    store.put_bytes(
        LAYOUT.server_control(0),
        encode(_random(50, 0.1), model.model_copy(update={"kind": PayloadKind.STATE})),
    )
    sent = ["fab-a", "fab-b", "fab-c"]  # fab-d sends nothing this round
    deltas = {site: _random(i + 1, 0.01) for i, site in enumerate(sent)}
    changes = {site: _random(i + 11, 0.1) for i, site in enumerate(sent)}
    for site in sent:
        meta = Metadata(
            kind=PayloadKind.UPDATE,
            training=LAYOUT.name,
            round=0,
            site=site,
            samples=SAMPLES[site],
            base_fingerprint=BASE,
            timings={"train_seconds": 1.0},
        )
        update = deltas[site] | {name + CONTROL_SUFFIX: t for name, t in changes[site].items()}
        store.put_bytes(LAYOUT.update(0, site), encode(update, meta))
    aggregator = RoundAggregator(store, LAYOUT, _spec())
    for site in sent:
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    aggregator.close(0, sent)
    control = decode(store.get_bytes(LAYOUT.server_control(1))).tensors
    model_1 = decode(store.get_bytes(LAYOUT.global_model(1))).tensors
    start, c0 = _random(0), _random(50, 0.1)
    total = sum(SAMPLES[s] for s in sent)
    for name in SHAPES:
        mean_change = np.mean([changes[s][name].double().numpy() for s in sent], axis=0)
        expected_c = c0[name].double().numpy() + 3 / 4 * mean_change
        np.testing.assert_allclose(control[name].double().numpy(), expected_c, rtol=1e-6, atol=1e-7)
        mean_delta = sum(SAMPLES[s] * deltas[s][name].double().numpy() for s in sent) / total
        np.testing.assert_allclose(
            model_1[name].double().numpy(), start[name].double().numpy() + mean_delta, rtol=1e-6, atol=1e-7
        )


def test_an_update_without_its_control_changes_is_rejected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    model = Metadata(kind=PayloadKind.MODEL, training=LAYOUT.name, round=0, base_fingerprint=BASE)
    store.put_bytes(LAYOUT.global_model(0), encode(_random(0), model))
    meta = Metadata(
        kind=PayloadKind.UPDATE,
        training=LAYOUT.name,
        round=0,
        site="fab-a",
        samples=10,
        base_fingerprint=BASE,
        timings={"train_seconds": 1.0},
    )
    store.put_bytes(LAYOUT.update(0, "fab-a"), encode(_random(1, 0.01), meta))
    verdict = RoundAggregator(store, LAYOUT, _spec()).submit(0, "fab-a")
    assert (verdict.accepted, verdict.reason) == (False, "names")
    assert "missing tensors" in (verdict.message or "")


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            {"aggregation": {"controlVariates": "scaffold", "strategy": "median"}},
            "which strategy median would not",
        ),
        ({"exchange": {"policy": "sparse", "topK": 0.1}}, "exchange policy sparse sends a part"),
        ({"training": {"transferDtype": "int8"}}, "not int8"),
        ({"mode": "localOnly"}, "mode localOnly"),
    ],
)
def test_scaffold_refuses_what_it_cannot_correct(extra: dict[str, Any], says: str) -> None:
    document = {
        "model": {"numClasses": 9},
        "aggregation": {"controlVariates": "scaffold"},
        "sites": [{"name": "fab-a", "data": {"synthetic": {}}}],
    }
    for key, value in extra.items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=says):
        FederatedTrainingSpec.model_validate(document, by_name=False)


# --------------------------------------------------------------------------------------------------
# two real rounds


def test_two_sites_train_two_rounds_with_scaffold(tmp_path: Path) -> None:
    lr, steps = 0.02, 3
    spec = tiny_spec(
        aggregation={"controlVariates": "scaffold"},
        training={
            "localSteps": steps,
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.0, "weightDecay": 0.0},
            "lrSchedule": {"name": "constant"},
            "gradClipNorm": None,
        },
    )
    store, layout = LocalStore(tmp_path), TrainingLayout("local", "scaffold-test")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    assert all(
        float(t.abs().sum()) == 0 for t in decode(store.get_bytes(layout.server_control(0))).tensors.values()
    )
    own: dict[str, dict[str, torch.Tensor]] = {}
    for round_index in range(2):
        server = decode(store.get_bytes(layout.server_control(round_index))).tensors
        for site in ("fab-a", "fab-b"):
            run_job(in_process_job(store, layout, spec, round_index, site, control=True))
            update = decode(store.get_bytes(layout.update(round_index, site))).tensors
            state = decode(store.get_bytes(state_key(site, round_index))).tensors
            names = [n for n in update if not n.endswith(CONTROL_SUFFIX)]
            for name in names:
                before = own.get(site, {}).get(name, torch.zeros_like(update[name]))
                # Option II with K steps at a constant rate: c_i+ = c_i - c + (x - y) / (K lr).
                expected = before - server[name] - update[name] / (steps * lr)
                torch.testing.assert_close(state[CONTROL_PREFIX + name], expected, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(
                    update[name + CONTROL_SUFFIX], expected - before, rtol=1e-4, atol=1e-5
                )
            own[site] = {
                n.removeprefix(CONTROL_PREFIX): t for n, t in state.items() if n.startswith(CONTROL_PREFIX)
            }
            verdict = aggregator.submit(round_index, site)
            assert verdict.accepted, verdict.message
        aggregator.close(round_index, ["fab-a", "fab-b"])
        after = decode(store.get_bytes(layout.server_control(round_index + 1))).tensors
        updates = [decode(store.get_bytes(layout.update(round_index, s))).tensors for s in own]
        for name, tensor in after.items():  # both of the two sites sent: c moves by their mean change
            mean_change = sum(update[name + CONTROL_SUFFIX] for update in updates) / 2
            torch.testing.assert_close(tensor, server[name] + mean_change, rtol=1e-5, atol=1e-6)
