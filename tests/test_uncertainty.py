"""evaluation.uncertainty: MC dropout against the plain model, and the error-detection figures
against direct numpy computations of their definitions."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedtrain.api import EvalMetrics
from fedtrain.evaluation import error_detection, pool
from fedtrain.trainer.uncertainty import dropout_kept_on, mc_dropout_probabilities, predictive_entropy


def test_mc_dropout_at_rate_0_is_the_plain_model(plain_vit: Any) -> None:
    model = plain_vit().eval()
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images).softmax(dim=1)
    torch.testing.assert_close(mc_dropout_probabilities(model, images, 5, 0.0, seed=3), plain)


def test_mc_dropout_varies_its_passes_repeats_with_its_seed_and_leaves_the_model_as_it_was(
    plain_vit: Any,
) -> None:
    model = plain_vit().eval()
    images = torch.randn(6, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images).softmax(dim=1)
    state = torch.random.get_rng_state()
    first = mc_dropout_probabilities(model, images, 8, 0.3, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "the caller's random state is untouched"
    torch.testing.assert_close(mc_dropout_probabilities(model, images, 8, 0.3, seed=3), first)
    assert not torch.allclose(first, plain, atol=1e-4), "dropout at 0.3 changes the prediction"
    torch.testing.assert_close(first.sum(dim=1), torch.ones(6))
    dropouts = [layer for layer in model.modules() if isinstance(layer, nn.Dropout)]
    assert dropouts, "timm's ViT has dropout layers (at p 0)"
    assert all(layer.p == 0.0 and not layer.training for layer in dropouts)
    with dropout_kept_on(model, 0.2):
        assert all(layer.p == 0.2 and layer.training for layer in dropouts)
        assert not model.training


def direct_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + half the ties: the AUROC's definition."""
    pairs = list(itertools.product(scores[positive], scores[~positive]))
    return float(np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs]))


def test_error_detection_equals_its_definition() -> None:
    rng = np.random.default_rng(4)
    probabilities = rng.dirichlet(np.full(5, 0.7), size=200)
    targets = rng.integers(0, 5, size=200)
    hits = probabilities.argmax(axis=1) == targets
    entropy = predictive_entropy(torch.from_numpy(probabilities)).numpy()
    direct_entropy = -(probabilities * np.log(probabilities)).sum(axis=1)
    assert entropy == pytest.approx(direct_entropy)

    rate, auroc = error_detection(entropy, hits)
    most_uncertain = np.argsort(entropy)[-20:]
    assert rate == pytest.approx(1 - hits[most_uncertain].mean())
    assert auroc == pytest.approx(direct_auroc(entropy, ~hits))
    assert error_detection(entropy, np.ones(200, dtype=bool))[1] is None, "no error to detect"


def test_pooled_detection_figures_are_the_sites_weighted_by_samples() -> None:
    def figures(samples: int, rate: float, auroc: float) -> EvalMetrics:
        return EvalMetrics(
            loss=1.0,
            accuracy=0.5,
            macro_f1=0.5,
            samples=samples,
            uncertain_error_rate=rate,
            error_auroc=auroc,
        )

    pooled = pool({"a": figures(100, 0.8, 0.7), "b": figures(300, 0.4, 0.9)})
    assert pooled is not None
    assert pooled.uncertain_error_rate == pytest.approx(0.5)
    assert pooled.error_auroc == pytest.approx(0.85)
