"""The "linear" protocol: a logistic-regression probe on frozen features, C chosen on the
validation split.

Test scores come in the shape metrics.compute_metrics takes: class probabilities [N, C] for
multiclass sets and per-label probabilities [N, C] for multi-label ones.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import ml_collections
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mermed_jax.eval import protocols
from mermed_jax.eval.inputs import feature_splits, frozen_features
from mermed_jax.eval.metrics import auroc_columns, one_hot

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    test_scores: np.ndarray
    chosen_c: float
    val_auroc: float


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray], task: str,
                 num_classes: int, c: float, max_iter: int) -> list[np.ndarray]:
    """Fits at inverse regularisation `c`; returns scores for each array in x_eval."""
    with warnings.catch_warnings():
        # A probe that has not fully converged still ranks; the validation AUROC judges it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if task == "multiclass":
            clf = LogisticRegression(C=c, max_iter=max_iter).fit(x_train, y_train)
            outs = []
            for x in x_eval:  # classes absent from the training subset get probability 0
                full = np.zeros((len(x), num_classes))
                full[:, clf.classes_] = clf.predict_proba(x)
                outs.append(full)
            return outs
        outs = [np.zeros((len(x), num_classes)) for x in x_eval]
        for label in range(num_classes):
            column = y_train[:, label]
            if column.min() == column.max():  # one value in training: predict its prevalence
                for out in outs:
                    out[:, label] = column[0]
                continue
            clf = LogisticRegression(C=c, max_iter=max_iter).fit(x_train, column)
            for out, x in zip(outs, x_eval):
                out[:, label] = clf.predict_proba(x)[:, 1]
        return outs


def _macro_auroc(labels: np.ndarray, scores: np.ndarray, task: str) -> float:
    targets = one_hot(labels, scores.shape[1]) if task == "multiclass" else labels
    per_class = auroc_columns(targets, scores)
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test_x: np.ndarray, task: str, num_classes: int, cs: Sequence[float] = DEFAULT_CS,
                 max_iter: int = 1000) -> ProbeResult:
    """Standardises features on the training split, picks C by validation macro AUROC, then scores
    the test split with that fit. (The official probes also refit nothing after choosing C.)"""
    scaler = StandardScaler().fit(train[0])
    x_train, x_val, x_test = (scaler.transform(x) for x in (train[0], val[0], test_x))
    best: ProbeResult | None = None
    for c in cs:
        val_scores, test_scores = _fit_predict(x_train, train[1], [x_val, x_test], task, num_classes, c, max_iter)
        auroc = _macro_auroc(val[1], val_scores, task)
        if best is None or auroc > best.val_auroc or (np.isnan(best.val_auroc) and not np.isnan(auroc)):
            best = ProbeResult(test_scores, float(c), auroc)
    return best


@protocols.register("linear", inputs=feature_splits, features=frozen_features, deterministic=True)
def _scores(config: ml_collections.ConfigDict, row: protocols.Row) -> protocols.Scores:
    f = row.key["feature"]
    result = linear_probe((row.train.features[f], row.train.labels), (row.val.features[f], row.val.labels),
                          row.test.features[f], row.dataset.task, len(row.dataset.label_names),
                          tuple(config.linear.cs), config.linear.max_iter)
    return protocols.Scores(result.test_scores, result.chosen_c)
