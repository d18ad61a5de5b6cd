"""Client drift: FedProx's proximal term (training.proximalMu) and FFA-LoRA (lora.aggregation frozenA).

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", 2020): each local step
minimises h(w) = F(w) + mu/2 · ||w - w_global||², w_global being the global model the site received,
over the shared tensors only (personal tensors have no global value). Checked against its definition
on a quadratic with a closed-form answer, step by step through the trainer's own `train_steps` on a
softmax regression computed in numpy, and in real rounds.

FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024): every LoRA
A stays at its seeded initialisation, the same everywhere, so only B (and the head) trains and travels,
and the mean of the sites' B times A is the mean of their B·A. Checked on the built model, and on the
tensors of two real sites' updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from torch import nn

from fedtrain.aggregator.rounds import RoundAggregator
from fedtrain.api import FederatedTrainingSpec
from fedtrain.codec import Metadata, Payload, PayloadKind, decode
from fedtrain.job import TrainerJob, TrainerSpec
from fedtrain.layout import TrainingLayout
from fedtrain.model import ExchangeError, ExchangePlan, FederatedModel, ModelError, build_model, timm_name
from fedtrain.store import LocalStore
from fedtrain.trainer import train as train_module
from fedtrain.trainer.data import ImageSet, SiteData
from fedtrain.trainer.train import (
    IncompatibleModelError,
    make_optimizer,
    make_scheduler,
    proximal_term,
    run_job,
    train_steps,
)

TINY_ARCHITECTURE = {"depth": 1, "embedDim": 32, "numHeads": 2}
SITES = ("fab-a", "fab-b")
#: Plain gradient descent: w <- w - lr · grad, nothing else (no momentum, decay, clipping or warm-up).
PLAIN_SGD = {
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weightDecay": 0.0},
    "lrSchedule": {"name": "constant", "warmupSteps": 0},
    "gradClipNorm": None,
}


def tiny_spec(**overrides: Any) -> FederatedTrainingSpec:
    document: dict[str, Any] = {
        "model": {"numClasses": 9, "imageSize": 28, "architecture": TINY_ARCHITECTURE},
        "lora": {"rank": 4},
        "training": {"rounds": 2, "localSteps": 3, "batchSize": 8, "seed": 5},
        "sites": [{"name": site, "data": {"synthetic": {"samples": 40}}} for site in SITES],
    }
    for key, value in overrides.items():
        document[key] = {**document.get(key, {}), **value}
    return FederatedTrainingSpec.model_validate(document)


def _job(store: LocalStore, layout: TrainingLayout, spec: FederatedTrainingSpec, site: str) -> TrainerJob:
    """Round 0 of `site`, with a private state (so the trainer runs as on a cluster)."""
    return TrainerJob(
        training=layout.name,
        round=0,
        site=site,
        spec=TrainerSpec.for_site(spec, site),
        global_model_url=store.presign_get(layout.global_model(0), 60),
        update_url=store.presign_put(layout.update(0, site), 60),
        state_get_url=store.presign_get(f"test-state/{site}/-1.safetensors", 60),
        state_put_url=store.presign_put(f"test-state/{site}/0.safetensors", 60),
    )


def _tensor_model(module: nn.Module, shared: Sequence[str], personal: Sequence[str] = ()) -> FederatedModel:
    """A FederatedModel around any module, with the split of its parameters given by hand."""
    count = sum(param.numel() for param in module.parameters())
    return FederatedModel(module, None, None, count, "", ExchangePlan(tuple(shared), tuple(personal)))


# --------------------------------------------------------------------------------------------------
# FedProx against its definition


class Quadratic(nn.Module):
    """F(w) = 1/2 ||w - c||²: the gradient is w - c."""

    def __init__(self, start: torch.Tensor, centre: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(start.clone())
        self.centre = centre

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.w - self.centre).square().sum()


def test_fedprox_gradient_descent_on_a_quadratic_reaches_the_closed_form_minimiser() -> None:
    """h(w) = 1/2 ||w - c||² + mu/2 ||w - g||² is minimal at w* = (c + mu g) / (1 + mu), and gradient
    descent from w0 = g contracts towards it by (1 - lr (1 + mu)) a step: w_k - w* = q^k (g - w*)."""
    mu, lr, steps = 3.0, 0.05, 12
    rng = np.random.default_rng(0)
    centre, received = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    module = Quadratic(torch.tensor(received, dtype=torch.float32), torch.tensor(centre, dtype=torch.float32))
    proximal = proximal_term(_tensor_model(module, ["w"]), mu, {"w": module.w.detach().clone()})
    assert proximal is not None
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    terms = []
    for _ in range(steps):
        penalty = proximal()
        terms.append(float(penalty.detach()))
        optimizer.zero_grad()
        (module.loss() + penalty).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    minimiser = (centre + mu * received) / (1 + mu)
    contraction = 1 - lr * (1 + mu)
    expected = minimiser + contraction**steps * (received - minimiser)
    np.testing.assert_allclose(module.w.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    # The term itself, mu/2 ||w_k - g||², at each w_k before its step: 0 at the start.
    path = [minimiser + contraction**k * (received - minimiser) for k in range(steps)]
    np.testing.assert_allclose(terms, [mu / 2 * np.sum((w - received) ** 2) for w in path], rtol=1e-5)
    assert terms[0] == 0.0


def test_a_zero_mu_or_nothing_shared_adds_no_term() -> None:
    module = nn.Linear(3, 2)
    received = {"weight": module.weight.detach().clone()}
    assert proximal_term(_tensor_model(module, ["weight"], ["bias"]), 0.0, received) is None
    assert proximal_term(_tensor_model(module, [], ["weight", "bias"]), 1.0, {}) is None


@dataclass(frozen=True)
class FeatureRows(ImageSet):
    """Inputs that are rows of a tensor, for a model that is not a ViT."""

    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, rows: npt.NDArray[np.int64]) -> torch.Tensor:
        return self.rows[torch.from_numpy(rows)]

    def subset(self, rows: npt.NDArray[np.int64]) -> ImageSet:
        return FeatureRows(self._decode(rows))


def _softmax_steps(
    weight: npt.NDArray[np.float64],
    bias: npt.NDArray[np.float64],
    features: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    mu: float,
    lr: float,
    steps: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[float]]:
    """Gradient descent on mean cross-entropy plus mu/2 ||W - W_global||² (W shared, b personal)."""
    received = weight.copy()
    onehot = np.eye(weight.shape[0])[labels]
    terms = []
    for _ in range(steps):
        logits = features @ weight.T + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - onehot) / len(labels)  # d(mean cross-entropy)/d(logits)
        terms.append(mu / 2 * float(np.sum((weight - received) ** 2)))
        weight = weight - lr * (error.T @ features + mu * (weight - received))
        bias = bias - lr * error.sum(axis=0)  # personal: no proximal pull
    return weight, bias, terms


@pytest.mark.parametrize("mu", [0.0, 2.5])
def test_train_steps_take_fedprox_steps_on_the_shared_tensors_only(mu: float) -> None:
    """The trainer's own loop (fp32), on a softmax regression whose steps numpy computes by hand."""
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(8, 5)).astype(np.float32), rng.integers(0, 3, size=8)
    module = nn.Linear(5, 3)
    model = _tensor_model(module, ["weight"], ["bias"])
    start_weight, start_bias = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    data = SiteData(
        FeatureRows(torch.tensor(features)),
        torch.tensor(labels),
        FeatureRows(torch.tensor(features[:0])),
        torch.tensor(labels[:0]),
        ["a", "b", "c"],
    )
    steps = 4
    spec = TrainerSpec.for_site(tiny_spec(training={**PLAIN_SGD, "localSteps": steps}), "fab-a")
    optimizer = make_optimizer(module.parameters(), spec)
    scheduler = make_scheduler(optimizer, spec, total_steps=steps)
    proximal = proximal_term(model, mu, model.exchanged_state())

    metrics = train_steps(
        model, data, spec, optimizer, scheduler, steps, torch.device("cpu"), None, torch.Generator(),
        batches=[torch.arange(8)] * steps, proximal=proximal,
    )  # fmt: skip

    weight, bias, terms = _softmax_steps(
        start_weight.astype(np.float64), start_bias.astype(np.float64), features.astype(np.float64),
        labels, mu, 0.1, steps,
    )  # fmt: skip
    np.testing.assert_allclose(module.weight.detach().numpy(), weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.bias.detach().numpy(), bias, rtol=1e-5, atol=1e-6)
    if mu == 0:
        assert proximal is None
        assert "proximal_term" not in metrics
    else:
        assert terms[0] == 0.0, "w0 is the global model"
        assert terms[1] > 0
        assert metrics["proximal_term"] == pytest.approx(np.mean(terms), rel=1e-5)


def _trained_round(tmp_path: Path, spec: FederatedTrainingSpec, site: str = "fab-a") -> Metadata:
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "drift")
    aggregator = RoundAggregator(store, layout, spec)
    aggregator.initialize()
    meta = run_job(_job(store, layout, spec, site))
    verdict = aggregator.submit(0, site)
    assert verdict.accepted, verdict.message
    return meta


def test_a_real_round_with_proximal_mu_moves_less_from_the_global_model(tmp_path: Path) -> None:
    training = {**PLAIN_SGD, "localSteps": 6}
    plain = _trained_round(tmp_path / "plain", tiny_spec(training=training))
    prox = _trained_round(tmp_path / "prox", tiny_spec(training={**training, "proximalMu": 5.0}))

    assert "proximal_term" not in plain.metrics
    assert prox.metrics["proximal_term"] > 0
    assert prox.config["proximal_mu"] == 5.0
    assert plain.norm is not None
    assert prox.norm is not None
    assert 0 < prox.norm < 0.9 * plain.norm, "FedProx pulls local training towards the global model"
    assert prox.metrics["evaluation"] == plain.metrics["evaluation"], "the same global model and data"


# --------------------------------------------------------------------------------------------------
# FFA-LoRA: frozen A


def _lora_names(model: FederatedModel, matrix: str) -> list[str]:
    return [name for name, _ in model.module.named_parameters() if f".{matrix}." in name]


def test_frozen_a_keeps_every_a_at_its_seeded_value_and_exchanges_b_and_the_head() -> None:
    naive, frozen = build_model(tiny_spec()), build_model(tiny_spec(lora={"aggregation": "frozenA"}))
    a_names = _lora_names(frozen, "lora_A")
    assert len(a_names) == 4, "qkv, proj, fc1, fc2 of one block"
    trainable = {name for name, param in frozen.module.named_parameters() if param.requires_grad}
    assert not trainable & set(a_names)
    assert set(frozen.exchanged_names()) == set(naive.exchanged_names()) - set(a_names)
    assert set(_lora_names(frozen, "lora_B")) <= set(frozen.exchanged_names())
    assert any(".head." in name for name in frozen.exchanged_names())
    assert frozen.personal_names() == []
    # A is the same seeded initialisation either way, and so is the base: one fingerprint.
    assert frozen.base_fingerprint == naive.base_fingerprint
    naive_params, frozen_params = (
        dict(naive.module.named_parameters()),
        dict(frozen.module.named_parameters()),
    )
    for name in a_names:
        assert torch.equal(frozen_params[name], naive_params[name]), name
        assert frozen_params[name].abs().sum() > 0, "peft draws A at random"
    for name in _lora_names(frozen, "lora_B"):
        assert torch.all(frozen_params[name] == 0), "peft starts B at zero"


def test_frozen_a_has_no_effect_under_rank_none() -> None:
    full = build_model(tiny_spec(lora={"rank": "none", "aggregation": "frozenA"}))
    assert full.rank is None
    assert all(param.requires_grad for param in full.module.parameters())
    assert full.exchanged_names() == build_model(tiny_spec(lora={"rank": "none"})).exchanged_names()


def test_an_exchange_pattern_for_a_frozen_a_matches_no_trainable_tensor() -> None:
    spec = tiny_spec(
        lora={"aggregation": "frozenA"},
        exchange={"policy": "fixed", "layers": ["blocks.*.attn.qkv.lora_A*"]},
    )
    with pytest.raises(
        ExchangeError, match=r"layers\[0\]: 'blocks.\*.attn.qkv.lora_A\*' matches no trainable"
    ):
        build_model(spec)
    only_b = tiny_spec(lora={"aggregation": "frozenA"}, exchange={"policy": "fixed", "layers": ["*.lora_B*"]})
    fixed_b = build_model(only_b)
    assert fixed_b.exchanged_names() == sorted(_lora_names(fixed_b, "lora_B"))


def test_a_global_model_of_a_naive_training_does_not_load_into_a_frozen_a_model(tmp_path: Path) -> None:
    naive, frozen = tiny_spec(), tiny_spec(lora={"aggregation": "frozenA"})
    with pytest.raises(ModelError, match="names differ"):
        build_model(frozen).load_exchanged(build_model(naive).exchanged_state())
    with pytest.raises(ModelError, match="names differ"):
        build_model(naive).load_exchanged(build_model(frozen).exchanged_state())
    # Through the trainer: the base fingerprints agree, the tensor names do not.
    store = LocalStore(tmp_path)
    layout = TrainingLayout("local", "mixed")
    RoundAggregator(store, layout, naive).initialize()
    with pytest.raises(IncompatibleModelError, match="names differ"):
        run_job(_job(store, layout, frozen, "fab-a"))
    assert not store.exists(layout.update(0, "fab-a"))


@pytest.fixture
def trained_models(monkeypatch: pytest.MonkeyPatch) -> list[FederatedModel]:
    """The model each run_job trains, kept after its round."""
    models: list[FederatedModel] = []
    real_train_steps = train_module.train_steps

    def keeping(model: FederatedModel, *args: Any, **kwargs: Any) -> dict[str, float]:
        models.append(model)
        metrics: dict[str, float] = real_train_steps(model, *args, **kwargs)
        return metrics

    monkeypatch.setattr(train_module, "train_steps", keeping)
    return models


def _two_site_round(tmp_path: Path, spec: FederatedTrainingSpec) -> tuple[list[Payload], RoundAggregator]:
    """Round 0 of both sites through run_job, folded and closed by the aggregator; their updates."""
    store = LocalStore(tmp_path)
    aggregator = RoundAggregator(store, TrainingLayout("local", "ffa"), spec)
    aggregator.initialize()
    for site in SITES:
        run_job(_job(store, aggregator.layout, spec, site))
        verdict = aggregator.submit(0, site)
        assert verdict.accepted, verdict.message
    aggregator.close(0, list(SITES))
    return [decode(store.get_bytes(aggregator.layout.update(0, site))) for site in SITES], aggregator


def _lora_pairs(model: FederatedModel) -> list[tuple[str, str]]:
    a_names, b_names = _lora_names(model, "lora_A"), _lora_names(model, "lora_B")
    assert [name.replace("lora_A", "lora_B") for name in a_names] == b_names
    return list(zip(a_names, b_names, strict=True))


def _numpy(tensor: torch.Tensor) -> npt.NDArray[np.float64]:
    return tensor.detach().cpu().double().numpy()


def test_two_frozen_a_sites_send_b_and_the_head_and_their_mean_is_exact(
    tmp_path: Path, trained_models: list[FederatedModel]
) -> None:
    spec = tiny_spec(lora={"aggregation": "frozenA"}, training={"localSteps": 4})
    initial = build_model(spec)
    initial_params = dict(initial.module.named_parameters())
    updates, aggregator = _two_site_round(tmp_path, spec)

    for update in updates:
        assert update.meta.kind is PayloadKind.UPDATE
        assert set(update.tensors) == set(initial.exchanged_names())
        assert not any("lora_A" in name for name in update.tensors)
        assert all("lora_B" in name or ".head." in name for name in update.tensors)
    assert len(trained_models) == len(SITES)
    for model in trained_models:
        params = dict(model.module.named_parameters())
        for name, _ in _lora_pairs(initial):
            assert torch.equal(params[name].detach().cpu(), initial_params[name]), f"{name} trained"
    global_model = decode(aggregator.store.get_bytes(aggregator.layout.global_model(1)))
    assert set(global_model.tensors) == set(initial.exchanged_names())
    aggregator.merge(1)
    merged = decode(aggregator.store.get_bytes(aggregator.layout.merged_model()))
    assert initial.alpha is not None
    assert initial.rank is not None
    scale = initial.alpha / initial.rank

    for a_name, b_name in _lora_pairs(initial):
        a, b0 = _numpy(initial_params[a_name]), _numpy(initial_params[b_name])
        site_b = [b0 + _numpy(update.tensors[b_name]) for update in updates]
        assert not np.allclose(site_b[0], site_b[1]), "each site trained its B its own way"
        # FFA-LoRA's point: with A shared and fixed, the mean of the products is the product of the mean.
        mean_of_products = np.mean([b @ a for b in site_b], axis=0)
        np.testing.assert_allclose(np.mean(site_b, axis=0) @ a, mean_of_products, rtol=1e-12, atol=1e-15)
        # The aggregator's global B (equal weights: 32 samples each) carries exactly that mean ΔW.
        global_b = _numpy(global_model.tensors[b_name])
        np.testing.assert_allclose(global_b @ a, mean_of_products, rtol=1e-5, atol=1e-7)
        # And the merged model folds that in over the seeded A: W = W0 + alpha/r · B · A.
        layer = timm_name(a_name).split(".lora_A")[0]
        base = _numpy(initial_params[f"base_model.model.{layer}.base_layer.weight"])
        np.testing.assert_allclose(
            _numpy(merged.tensors[f"{layer}.weight"]), base + scale * mean_of_products, rtol=1e-5, atol=1e-6
        )


def test_two_naive_sites_average_a_and_b_apart_and_miss_the_mean_product(tmp_path: Path) -> None:
    """The contrast: A trains at each site, and mean(B) · mean(A) is not the mean of B_i · A_i."""
    spec = tiny_spec(training={"localSteps": 4})
    initial = build_model(spec)
    initial_params = dict(initial.module.named_parameters())
    updates, _ = _two_site_round(tmp_path, spec)
    errors = []
    for a_name, b_name in _lora_pairs(initial):
        site_a = [_numpy(initial_params[a_name]) + _numpy(update.tensors[a_name]) for update in updates]
        site_b = [_numpy(initial_params[b_name]) + _numpy(update.tensors[b_name]) for update in updates]
        mean_of_products = np.mean([b @ a for a, b in zip(site_a, site_b, strict=True)], axis=0)
        product_of_means = np.mean(site_b, axis=0) @ np.mean(site_a, axis=0)
        errors.append(np.linalg.norm(product_of_means - mean_of_products) / np.linalg.norm(mean_of_products))
    assert min(errors) > 1e-4, errors
