"""Frozen-feature protocols: kNN against a NumPy reference, the linear probe on separable features,
stratified label-fraction subsets and splits."""

import numpy as np
import pytest

from mermed_jax.eval import metrics, subsets
from mermed_jax.eval.protocols import knn, linear_probe


def _reference_knn(train_x, train_targets, test_x, k, temperature):
    """DINO's weighted kNN written out row by row."""
    out = []
    for q in test_x:
        sims = np.array([q @ t / (np.linalg.norm(q) * np.linalg.norm(t)) for t in train_x])
        nearest = np.argsort(-sims)[:k]
        weights = np.exp(sims[nearest] / temperature)
        out.append((weights[:, None] * train_targets[nearest]).sum(0) / weights.sum())
    return np.array(out)


@pytest.mark.parametrize("multi_label", [False, True])
def test_knn_matches_numpy_reference(multi_label):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    targets = rng.integers(0, 2, (60, 3)) if multi_label else metrics.one_hot(rng.integers(0, 3, 60), 3)
    got = knn.knn_scores(train_x, targets, test_x, k=20, temperature=0.07, chunk=7)
    np.testing.assert_allclose(got, _reference_knn(train_x, targets, test_x, 20, 0.07), rtol=1e-4, atol=1e-6)


def _separable(rng, n, num_classes, dim=16):
    labels = np.arange(n) % num_classes
    centres = rng.normal(size=(num_classes, dim)) * 4
    return centres[labels] + rng.normal(size=(n, dim)), labels


def test_linear_probe_separates_separable_features():
    # One seed for all three splits, so that they share the class centres.
    train, val, test = (_separable(np.random.default_rng(0), n, 3) for n in (90, 30, 60))
    result = linear_probe.linear_probe(train, val, test[0], "multiclass", 3, cs=(0.01, 1.0))
    assert result.chosen_c in (0.01, 1.0)
    assert metrics.compute_metrics(test[1], result.test_scores, "multiclass").scalars["auroc"] > 0.99
    np.testing.assert_allclose(result.test_scores.sum(1), 1.0, rtol=1e-6)


def test_linear_probe_multilabel_and_a_label_constant_in_training():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0.5, np.zeros(120, bool)], 1).astype(int)
    result = linear_probe.linear_probe((x[:80], y[:80]), (x[80:100], y[80:100]), x[100:], "multilabel", 3, cs=(1.0,))
    per_label = metrics.auroc_columns(y[100:], result.test_scores)
    assert per_label[0] > 0.95 and per_label[1] > 0.95 and np.isnan(per_label[2])
    assert np.all(result.test_scores[:, 2] == 0)


def test_label_fraction_subsets_are_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    subset = subsets.stratified_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [50, 30, 20]
    assert subsets.stratified_subset(labels, 0.01, 0).size == 10  # 5 + 3 + 2
    assert np.bincount(labels[subsets.stratified_subset(labels, 0.001, 0)]).tolist() == [1, 1, 1]
    np.testing.assert_array_equal(subset, subsets.stratified_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, subsets.stratified_subset(labels, 0.1, seed=1))
    assert subsets.stratified_subset(labels, 1.0, 3).size == 1000
    multi = np.zeros((100, 3), int)
    multi[:40, 0] = multi[40:70, 1] = 1
    assert np.bincount(subsets.strata(multi[subsets.stratified_subset(multi, 0.5, 0)])).tolist() == [20, 15, 0, 15]


def test_stratified_split_70_15_15():
    labels = np.repeat([0, 1], [100, 40])
    parts = subsets.stratified_split(labels, seed=42)
    assert [np.bincount(labels[p]).tolist() for p in parts] == [[70, 28], [15, 6], [15, 6]]
    assert sorted(np.concatenate(parts).tolist()) == list(range(140))
