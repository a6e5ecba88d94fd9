"""Classification metrics of one evaluation row, their bootstrap CI on the test set, and the mean
with a 95% CI over seeds.

Two tasks. "multiclass" (binary included, as two classes): labels are class indices [N], scores are
probabilities [N, C]; the headline is the macro one-vs-rest AUROC (for two classes it equals the
usual binary AUROC). "multilabel": labels are multi-hot [N, C], scores per-label sigmoid
probabilities [N, C]; AUROC and AUPRC are macro over labels, and the thresholded metrics use 0.5 per
label (accuracy is the mean per-label accuracy, not the exact-match ratio).

A class without both positives and negatives in the test split has no AUROC: its per-class value is
NaN, the macro mean covers the classes that have one, and `notes` says which class was left out and
why, so a reader never mistakes a mean over fewer classes for the full one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
from sklearn import metrics as skm

TASKS = ("multiclass", "multilabel")
ECE_BINS = 15


@dataclasses.dataclass(frozen=True)
class MetricResult:
    scalars: dict[str, float]  # auroc, auprc, accuracy, balanced_accuracy, f1_macro, sensitivity, specificity, ece
    per_class_auroc: dict[str, float]  # NaN where undefined
    notes: tuple[str, ...]


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.int32)[np.asarray(labels, np.int64)]


def _targets(labels: np.ndarray, num_classes: int, task: str) -> np.ndarray:
    """[N, C] 0/1 targets of either task."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {TASKS}")
    labels = np.asarray(labels)
    if task == "multiclass":
        if labels.ndim != 1:
            raise ValueError(f"multiclass labels must be class indices [N], got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside [0, {num_classes}): {np.unique(labels).tolist()}")
        return one_hot(labels, num_classes)
    if labels.shape[1:] != (num_classes,):
        raise ValueError(f"multilabel labels must be multi-hot [N, {num_classes}], got shape {labels.shape}")
    return labels.astype(np.int32)


def _defined(targets: np.ndarray) -> np.ndarray:
    """Which columns have both positives and negatives (AUROC defined)."""
    positives = targets.sum(0)
    return (positives > 0) & (positives < len(targets))


def auroc_columns(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-column AUROC by the rank (Mann-Whitney) formula, ties averaged; NaN where undefined.

    Equal to sklearn's roc_auc_score column by column, and vectorised so that a bootstrap of a
    thousand resamples costs milliseconds.
    """
    n = len(targets)
    ranks = scipy.stats.rankdata(scores, axis=0)
    positives = targets.sum(0).astype(np.float64)
    negatives = n - positives
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * targets).sum(0) - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where(_defined(targets), auc, np.nan)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| weighted by size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _missing_notes(targets: np.ndarray, class_names: Sequence[str], split: str) -> list[str]:
    notes = []
    for c in np.flatnonzero(~_defined(targets)):
        what = "no positive" if targets[:, c].sum() == 0 else "no negative"
        notes.append(f"class {class_names[c]!r} (index {c}) has {what} example in the {split} split: its AUROC "
                     f"and AUPRC are undefined and left out of the macro means")
    return notes


def compute_metrics(labels: np.ndarray, scores: np.ndarray, task: str,
                    class_names: Sequence[str] | None = None, split: str = "test") -> MetricResult:
    """Every metric of one set of test predictions (see the module docstring for conventions)."""
    scores = np.asarray(scores, np.float64)
    num_classes = scores.shape[1]
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for scores of {num_classes} classes")
    targets = _targets(labels, num_classes, task)
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} labels but {len(scores)} score rows")
    defined = _defined(targets)
    if not defined.any():
        raise ValueError(f"no class has both positive and negative examples in the {split} split "
                         f"({len(targets)} examples): AUROC is undefined for every class")
    per_class = auroc_columns(targets, scores)
    auprc = [skm.average_precision_score(targets[:, c], scores[:, c]) for c in np.flatnonzero(defined)]

    if task == "multiclass":
        y = np.asarray(labels)
        pred = scores.argmax(1)
        present = np.unique(y)
        confusion = skm.confusion_matrix(y, pred, labels=np.arange(num_classes))
        tp = np.diag(confusion).astype(np.float64)
        fn, fp = confusion.sum(1) - tp, confusion.sum(0) - tp
        tn = confusion.sum() - tp - fn - fp
        if num_classes == 2:  # class 1 is the positive class
            sensitivity, specificity = tp[1] / max(tp[1] + fn[1], 1), tn[1] / max(tn[1] + fp[1], 1)
        else:
            sensitivity = float(np.mean((tp / np.maximum(tp + fn, 1))[present]))
            specificity = float(np.mean((tn / np.maximum(tn + fp, 1))[present]))
        accuracy = skm.accuracy_score(y, pred)
        balanced = skm.balanced_accuracy_score(y, pred)
        f1 = skm.f1_score(y, pred, labels=present, average="macro", zero_division=0)
        ece = expected_calibration_error(scores.max(1), (pred == y).astype(np.float64))
    else:
        pred = (scores >= 0.5).astype(np.int32)
        tp = (pred * targets).sum(0).astype(np.float64)
        fn = ((1 - pred) * targets).sum(0)
        fp = (pred * (1 - targets)).sum(0)
        tn = ((1 - pred) * (1 - targets)).sum(0)
        sens_c = tp / np.maximum(tp + fn, 1)
        spec_c = tn / np.maximum(tn + fp, 1)
        sensitivity, specificity = float(sens_c[targets.sum(0) > 0].mean()), float(spec_c.mean())
        accuracy = float((pred == targets).mean())
        balanced = float(((sens_c + spec_c) / 2)[defined].mean())
        f1 = skm.f1_score(targets[:, defined], pred[:, defined], average="macro", zero_division=0)
        flat = scores.ravel()
        ece = expected_calibration_error(np.maximum(flat, 1 - flat), ((flat >= 0.5) == targets.ravel()).astype(np.float64))

    scalars = dict(
        auroc=float(np.nanmean(per_class)), auprc=float(np.mean(auprc)), accuracy=float(accuracy),
        balanced_accuracy=float(balanced), f1_macro=float(f1), sensitivity=float(sensitivity),
        specificity=float(specificity), ece=ece,
    )
    return MetricResult(scalars, dict(zip(class_names, map(float, per_class))), tuple(_missing_notes(targets, class_names, split)))


def bootstrap_auroc_ci(labels: np.ndarray, scores: np.ndarray, task: str, *, resamples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the macro AUROC over test examples.

    A resample in which no class has both positives and negatives has no AUROC and is dropped;
    classes undefined in a resample are left out of that resample's macro mean, as in compute_metrics.
    """
    scores = np.asarray(scores, np.float64)
    targets = _targets(labels, scores.shape[1], task)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        idx = rng.integers(0, len(targets), len(targets))
        per_class = auroc_columns(targets[idx], scores[idx])
        if np.isfinite(per_class).any():
            values.append(np.nanmean(per_class))
    if not values:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval over seeds; with one value the interval is NaN."""
    values = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = scipy.stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - float(half), mean + float(half)
