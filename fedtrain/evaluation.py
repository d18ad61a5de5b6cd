"""Classification figures from counts: what a site computes from its predictions, and what the engine
computes for all sites from the sum of theirs.

Macro-F1 and per-class accuracy are functions of three per-class counts (support, predicted,
correct), and the expected calibration error of per-bin sums, so summing the sites' counts gives the
figures of the pooled predictions exactly, while no image, label or prediction leaves a site. Pure
numpy: the operator, which imports no torch, pools with the same code the trainers score with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from fedtrain.api import CALIBRATION_BINS, MAX_COUNTED_CLASSES, CalibrationBins, ClassCounts, EvalMetrics

#: Summed counts may differ from the figures they came from by float rounding only.
_TOLERANCE: Final = 1e-6


def class_counts(
    predictions: npt.NDArray[np.integer], targets: npt.NDArray[np.integer], class_count: int
) -> ClassCounts:
    """Per class: how many samples it has, how many were predicted as it, how many of both."""
    hits = predictions == targets
    return ClassCounts(
        support=np.bincount(targets, minlength=class_count).tolist(),
        predicted=np.bincount(predictions, minlength=class_count).tolist(),
        correct=np.bincount(targets[hits], minlength=class_count).tolist(),
    )


def calibration_bins(confidences: npt.NDArray[np.floating], hits: npt.NDArray[np.bool_]) -> CalibrationBins:
    """Top-class probabilities in CALIBRATION_BINS equal-width bins; bin b holds (b/B, (b+1)/B], the
    first bin also 0."""
    index = np.clip(np.ceil(confidences * CALIBRATION_BINS).astype(np.int64) - 1, 0, CALIBRATION_BINS - 1)
    return CalibrationBins(
        count=np.bincount(index, minlength=CALIBRATION_BINS).tolist(),
        confidence=np.bincount(index, weights=confidences, minlength=CALIBRATION_BINS).tolist(),
        correct=np.bincount(index[hits], minlength=CALIBRATION_BINS).tolist(),
    )


def expected_calibration_error(bins: CalibrationBins) -> float:
    """sum_b n_b / N |accuracy_b - confidence_b| (Guo et al. 2017): sum_b |correct_b - confidence_b| / N."""
    total = sum(bins.count)
    if total == 0:
        return 0.0
    gaps = np.abs(np.asarray(bins.correct, dtype=np.float64) - np.asarray(bins.confidence))
    return float(gaps.sum() / total)


def macro_f1(counts: ClassCounts) -> float:
    """The mean F1 over the classes present (support > 0); a class never predicted has precision 0."""
    support = np.asarray(counts.support, dtype=np.float64)
    predicted = np.asarray(counts.predicted, dtype=np.float64)
    correct = np.asarray(counts.correct, dtype=np.float64)
    present = support > 0
    if not present.any():
        return 0.0
    # F1 = 2 TP / (2 TP + FP + FN) = 2 correct / (support + predicted), 0 where both are 0.
    f1 = np.divide(
        2 * correct, support + predicted, out=np.zeros_like(correct), where=support + predicted > 0
    )
    return float(f1[present].mean())


def per_class_accuracy(counts: ClassCounts, class_names: list[str]) -> dict[str, float | None]:
    """Each class's recall; None for a class with no samples."""
    return {
        name: (correct / support if support else None)
        for name, support, correct in zip(class_names, counts.support, counts.correct, strict=True)
    }


def error_detection(
    entropy: npt.NDArray[np.floating], hits: npt.NDArray[np.bool_], share: float = 0.1
) -> tuple[float | None, float | None]:
    """How well predictive entropy flags errors: the error rate among the `share` of predictions
    with the highest entropy, and the AUROC of entropy as a detector of errors (scikit-learn's;
    None where there are no errors or nothing but errors)."""
    if not len(hits):
        return None, None
    uncertain = np.argsort(-entropy, kind="stable")[: max(1, round(share * len(hits)))]
    rate = float(1.0 - hits[uncertain].mean())
    errors = ~hits
    if errors.all() or not errors.any():
        return rate, None
    from sklearn.metrics import roc_auc_score  # the trainers' dependency, not the operator's

    return rate, float(roc_auc_score(errors, entropy))


def scored(loss: float, counts: ClassCounts, calibration: CalibrationBins | None) -> EvalMetrics:
    """A split's figures from its counts; the counts travel with them where the model has at most
    MAX_COUNTED_CLASSES classes (the status holds them)."""
    samples = sum(counts.support)
    keep = len(counts.support) <= MAX_COUNTED_CLASSES
    return EvalMetrics(
        loss=loss,
        accuracy=sum(counts.correct) / samples if samples else 0.0,
        macro_f1=macro_f1(counts),
        samples=samples,
        ece=expected_calibration_error(calibration) if calibration is not None else None,
        class_counts=counts if keep else None,
        calibration=calibration if keep else None,
    )


def pool(per_site: Mapping[str, EvalMetrics]) -> EvalMetrics | None:
    """All sites' figures: loss and accuracy weighted by samples (exactly the pooled ones); macro-F1
    and ECE from the summed counts where every site sent them, else the sites' weighted means."""
    reports = [metrics for metrics in per_site.values() if metrics.samples > 0]
    total = sum(metrics.samples for metrics in reports)
    if total == 0:
        return None

    def mean(values: list[float]) -> float:
        return float(
            sum(value * metrics.samples for value, metrics in zip(values, reports, strict=True)) / total
        )

    loss = mean([metrics.loss for metrics in reports])
    detection = {
        name: mean([getattr(metrics, name) for metrics in reports])
        for name in ("uncertain_error_rate", "error_auroc")
        if all(getattr(metrics, name) is not None for metrics in reports)
    }
    counted = [metrics.class_counts for metrics in reports if metrics.class_counts is not None]
    binned = [metrics.calibration for metrics in reports if metrics.calibration is not None]
    if len(counted) == len(reports) and len(binned) == len(reports):
        pooled = scored(loss, _summed_counts(counted), _summed_bins(binned))
        return pooled.model_copy(update={"pooled": True, **detection})
    eces = [metrics.ece for metrics in reports]
    return EvalMetrics(
        loss=loss,
        accuracy=mean([metrics.accuracy for metrics in reports]),
        macro_f1=mean([metrics.macro_f1 for metrics in reports]),
        samples=total,
        ece=mean([ece or 0.0 for ece in eces]) if None not in eces else None,
        pooled=False,
        **detection,
    )


def _summed_counts(counts: list[ClassCounts]) -> ClassCounts:
    """The sites' counts added class by class (the aggregator checked each has one per class)."""
    return ClassCounts(
        support=np.sum([c.support for c in counts], axis=0, dtype=np.int64).tolist(),
        predicted=np.sum([c.predicted for c in counts], axis=0, dtype=np.int64).tolist(),
        correct=np.sum([c.correct for c in counts], axis=0, dtype=np.int64).tolist(),
    )


def _summed_bins(bins: list[CalibrationBins]) -> CalibrationBins:
    return CalibrationBins(
        count=np.sum([b.count for b in bins], axis=0, dtype=np.int64).tolist(),
        confidence=np.sum([b.confidence for b in bins], axis=0, dtype=np.float64).tolist(),
        correct=np.sum([b.correct for b in bins], axis=0, dtype=np.int64).tolist(),
    )


def check_reported(metrics: EvalMetrics, class_count: int) -> None:
    """ValueError naming what is wrong where a site's figures and counts cannot be one split's."""
    optional = (metrics.ece, metrics.uncertain_error_rate, metrics.error_auroc)
    scores = (metrics.accuracy, metrics.macro_f1, *(score for score in optional if score is not None))
    if not (np.isfinite(metrics.loss) and metrics.loss >= 0 and all(0 <= s <= 1 for s in scores)):
        raise ValueError(f"evaluation scores out of range: {metrics}")
    if metrics.samples < 0:
        raise ValueError(f"evaluation of {metrics.samples} samples")
    if metrics.class_counts is not None:
        _check_counts(metrics, metrics.class_counts, class_count)
    if metrics.calibration is not None:
        _check_bins(metrics, metrics.calibration)


def _check_counts(metrics: EvalMetrics, counts: ClassCounts, class_count: int) -> None:
    lists = (counts.support, counts.predicted, counts.correct)
    if any(len(values) != class_count for values in lists):
        raise ValueError(f"class counts must have one entry per class ({class_count})")
    if any(value < 0 for values in lists for value in values):
        raise ValueError("class counts must not be negative")
    if sum(counts.support) != metrics.samples or sum(counts.predicted) != metrics.samples:
        raise ValueError(f"class counts do not add up to the {metrics.samples} samples scored")
    if any(c > min(s, p) for s, p, c in zip(*lists, strict=True)):
        raise ValueError("a class has more correct predictions than samples or predictions")
    if metrics.samples and abs(sum(counts.correct) / metrics.samples - metrics.accuracy) > _TOLERANCE:
        raise ValueError("class counts disagree with the accuracy reported")


def _check_bins(metrics: EvalMetrics, bins: CalibrationBins) -> None:
    lists = (bins.count, bins.confidence, bins.correct)
    if any(len(values) != CALIBRATION_BINS for values in lists):
        raise ValueError(f"calibration must have {CALIBRATION_BINS} bins")
    if sum(bins.count) != metrics.samples:
        raise ValueError(f"calibration bins do not add up to the {metrics.samples} samples scored")
    for index, (count, confidence, correct) in enumerate(zip(*lists, strict=True)):
        low, high = index / CALIBRATION_BINS, (index + 1) / CALIBRATION_BINS
        in_bin = count * low - _TOLERANCE <= confidence <= count * high + _TOLERANCE
        if count < 0 or not 0 <= correct <= count or not in_bin:
            raise ValueError(f"calibration bin {index} is not {count} confidences in ({low:.3f}, {high:.3f}]")
