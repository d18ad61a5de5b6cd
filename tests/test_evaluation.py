"""Figures from counts (fedtrain/evaluation.py) against direct numpy computations of their definitions:
a site's figures from its predictions, and all sites' from the sum of their counts, which must be the
figures of the pooled predictions."""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt
import pytest

from fedtrain.api import CALIBRATION_BINS, EvalMetrics
from fedtrain.evaluation import (
    calibration_bins,
    check_reported,
    class_counts,
    expected_calibration_error,
    per_class_accuracy,
    pool,
    scored,
)

CLASSES = 5


def direct_macro_f1(predictions: npt.NDArray[np.int64], targets: npt.NDArray[np.int64]) -> float:
    """F1 per class present from precision and recall, averaged: the textbook definition."""
    scores = []
    for label in np.unique(targets):
        true_positive = np.sum((predictions == label) & (targets == label))
        precision = true_positive / max(np.sum(predictions == label), 1)
        recall = true_positive / np.sum(targets == label)
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def direct_ece(confidences: npt.NDArray[np.float64], hits: npt.NDArray[np.bool_]) -> float:
    """Guo et al.'s ECE with bins (b/B, (b+1)/B], each sample placed by comparing with the edges."""
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidences > low) & (confidences <= high)
        if low == 0:
            inside |= confidences == 0
        if inside.any():
            total += inside.sum() / len(confidences) * abs(hits[inside].mean() - confidences[inside].mean())
    return float(total)


def site(seed: int, count: int, skew: float) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Non-IID labels (a site dominated by a few classes) and softmax outputs that are right often."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(CLASSES, skew))
    targets = rng.choice(CLASSES, size=count, p=weights)
    logits = rng.normal(size=(count, CLASSES))
    logits[np.arange(count), targets] += rng.uniform(0, 3, size=count)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return targets, probabilities


def figures(targets: npt.NDArray[np.int64], probabilities: npt.NDArray[np.float64]) -> EvalMetrics:
    predictions = probabilities.argmax(axis=1)
    nll = float(-np.log(probabilities[np.arange(len(targets)), targets]).mean())
    counts = class_counts(predictions, targets, CLASSES)
    return scored(nll, counts, calibration_bins(probabilities.max(axis=1), predictions == targets))


def test_a_sites_figures_equal_their_definitions() -> None:
    targets, probabilities = site(1, 300, skew=0.5)
    predictions = probabilities.argmax(axis=1)
    result = figures(targets, probabilities)

    assert result.accuracy == pytest.approx(np.mean(predictions == targets))
    assert result.macro_f1 == pytest.approx(direct_macro_f1(predictions, targets))
    assert result.ece == pytest.approx(direct_ece(probabilities.max(axis=1), predictions == targets))
    assert result.samples == 300
    assert result.class_counts is not None
    recall = per_class_accuracy(result.class_counts, [str(c) for c in range(CLASSES)])
    for label in range(CLASSES):
        wanted = np.mean(predictions[targets == label] == label) if np.any(targets == label) else None
        assert recall[str(label)] == (pytest.approx(wanted) if wanted is not None else None)


def test_summed_counts_give_the_pooled_predictions_figures_not_the_mean_of_the_sites() -> None:
    sites = [site(seed, count, skew=0.2) for seed, count in ((2, 120), (3, 400), (4, 60))]
    pooled = pool({f"s{i}": figures(*data) for i, data in enumerate(sites)})
    targets = np.concatenate([t for t, _ in sites])
    probabilities = np.concatenate([p for _, p in sites])
    predictions = probabilities.argmax(axis=1)
    mean_of_sites = sum(figures(*data).macro_f1 * len(data[0]) for data in sites) / len(targets)

    assert pooled is not None
    assert pooled.pooled is True
    assert pooled.samples == len(targets)
    assert pooled.accuracy == pytest.approx(np.mean(predictions == targets))
    assert pooled.macro_f1 == pytest.approx(direct_macro_f1(predictions, targets))
    assert pooled.ece == pytest.approx(direct_ece(probabilities.max(axis=1), predictions == targets))
    nll = -np.log(probabilities[np.arange(len(targets)), targets]).mean()
    assert pooled.loss == pytest.approx(nll)
    # On non-IID sites the weighted mean of the sites' own macro-F1 is another (lower) figure.
    assert abs(mean_of_sites - pooled.macro_f1) > 0.01


def test_a_site_without_counts_makes_the_pool_a_weighted_mean_and_says_so() -> None:
    with_counts = figures(*site(5, 100, skew=1.0))
    without = with_counts.compact().model_copy(update={"ece": None})
    pooled = pool({"a": with_counts, "b": without})
    assert pooled is not None
    assert pooled.pooled is False
    assert pooled.macro_f1 == pytest.approx(with_counts.macro_f1)
    assert pooled.ece is None


def test_ece_of_a_perfectly_calibrated_histogram_is_zero() -> None:
    confidences = np.full(1000, 0.7)
    hits = np.arange(1000) < 700
    assert expected_calibration_error(calibration_bins(confidences, hits)) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"class_counts": {"support": [1, 1], "predicted": [1, 1], "correct": [1, 1]}},
            "one entry per class",
        ),
        ({"samples": 299}, "do not add up"),
        ({"accuracy": 0.99}, "disagree with the accuracy"),
        ({"ece": 1.5}, "out of range"),
        (
            {
                "calibration": {
                    "count": [300] + [0] * 14,
                    "confidence": [299.0] + [0.0] * 14,
                    "correct": [0] * 15,
                }
            },
            "bin 0",
        ),
    ],
)
def test_reported_counts_that_cannot_be_one_splits_are_refused(
    change: dict[str, object], message: str
) -> None:
    good = figures(*site(6, 300, skew=1.0))
    check_reported(good, CLASSES)
    bad = EvalMetrics.model_validate({**good.model_dump(), **change})
    with pytest.raises(ValueError, match=message):
        check_reported(bad, CLASSES)
