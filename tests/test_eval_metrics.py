"""Evaluation metrics against hand-computed cases (binary, multi-class macro OvR, multi-label, a class
missing from the test split) and against scikit-learn."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from mermed_jax.eval import metrics


def test_binary_hand_computed():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    result = metrics.compute_metrics(labels, np.stack([1 - p1, p1], 1), "multiclass", ("neg", "pos"))
    s = result.scalars
    assert s["auroc"] == pytest.approx(0.75)  # 3 of 4 positive-negative pairs ordered
    assert s["auprc"] == pytest.approx(5 / 6)  # both classes: precision 1 then 2/3
    assert s["accuracy"] == pytest.approx(0.75)  # argmax predicts 0, 0, 0, 1
    assert s["sensitivity"] == pytest.approx(0.5) and s["specificity"] == pytest.approx(1.0)
    assert s["balanced_accuracy"] == pytest.approx(0.75)
    assert s["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    # Confidences 0.9, 0.6, 0.65, 0.8 fall in four different bins; correct: yes, yes, no, yes.
    assert s["ece"] == pytest.approx((0.1 + 0.4 + 0.65 + 0.2) / 4)
    assert result.per_class_auroc == {"neg": pytest.approx(0.75), "pos": pytest.approx(0.75)}
    assert result.notes == ()


def test_multiclass_macro_ovr_hand_computed():
    labels = np.array([0, 1, 2, 0, 1, 2])
    scores = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .3, .6], [.3, .4, .3], [.5, .2, .3], [.2, .2, .6]])
    result = metrics.compute_metrics(labels, scores, "multiclass")
    # class 0: 7 of 8 pairs; class 1: 4 pairs + one tie (0.5) of 8; class 2: 8 of 8.
    assert list(result.per_class_auroc.values()) == pytest.approx([7 / 8, 4.5 / 8, 1.0])
    assert result.scalars["auroc"] == pytest.approx((7 / 8 + 4.5 / 8 + 1) / 3)
    assert result.scalars["auroc"] == pytest.approx(skm.roc_auc_score(labels, scores, multi_class="ovr"))


def test_multilabel_hand_computed():
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[.9, .2], [.3, .8], [.6, .25], [.1, .3]])
    result = metrics.compute_metrics(targets, scores, "multilabel", ("a", "b"))
    assert result.per_class_auroc == {"a": pytest.approx(1.0), "b": pytest.approx(0.75)}
    s = result.scalars
    assert s["auroc"] == pytest.approx(0.875)
    assert s["accuracy"] == pytest.approx(7 / 8)  # label b misses one positive at 0.5
    assert s["sensitivity"] == pytest.approx(0.75) and s["specificity"] == pytest.approx(1.0)


def test_class_missing_from_test_split_is_left_out_with_a_clear_message():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([[.7, .2, .1], [.2, .7, .1], [.3, .6, .1], [.1, .8, .1]])
    result = metrics.compute_metrics(labels, scores, "multiclass", ("normal", "mass", "nodule"))
    assert math.isnan(result.per_class_auroc["nodule"])
    assert result.scalars["auroc"] == pytest.approx(np.mean([result.per_class_auroc["normal"], result.per_class_auroc["mass"]]))
    assert len(result.notes) == 1 and "'nodule'" in result.notes[0] and "no positive example in the test split" in result.notes[0]
    with pytest.raises(ValueError, match="no class has both positive and negative examples in the test split"):
        metrics.compute_metrics(np.zeros(3, int), np.full((3, 2), 0.5), "multiclass")


def test_rank_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, (50, 4))
    scores = rng.integers(0, 5, (50, 4)) / 4  # many ties
    expected = [skm.roc_auc_score(targets[:, c], scores[:, c]) for c in range(4)]
    np.testing.assert_allclose(metrics.auroc_columns(targets, scores), expected)


def test_bootstrap_and_seed_intervals():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    scores = np.stack([1 - p1, p1], 1)
    point = metrics.compute_metrics(labels, scores, "multiclass").scalars["auroc"]
    low, high = metrics.bootstrap_auroc_ci(labels, scores, "multiclass", resamples=300)
    assert low < point < high and high - low < 0.2
    mean, low, high = metrics.mean_ci([0.8, 0.9])
    assert mean == pytest.approx(0.85) and high - mean == pytest.approx(12.7062 * 0.0707107 / 2 ** 0.5, rel=1e-4)
    assert math.isnan(metrics.mean_ci([0.8])[1])
