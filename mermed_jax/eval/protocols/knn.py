"""The "knn" protocol: DINO's weighted k-nearest-neighbour classifier on frozen features.

Test scores come in the shape metrics.compute_metrics takes: class probabilities [N, C] for
multiclass sets and per-label probabilities [N, C] for multi-label ones.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mermed_jax.eval import protocols
from mermed_jax.eval.inputs import feature_splits, frozen_features
from mermed_jax.eval.metrics import one_hot


def knn_scores(train_x: np.ndarray, train_targets: np.ndarray, test_x: np.ndarray, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """DINO's kNN: cosine similarity, the k nearest training examples vote with weight
    exp(sim / T) for their one-hot (or multi-hot) targets; votes are normalised to sum to one over
    the neighbours' weights, which keeps DINO's ranking and gives probabilities for calibration.

    train_targets: [N_train, C] one-hot or multi-hot.
    """
    def normalise(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    train_n, test_n = normalise(train_x), normalise(test_x)
    targets = np.asarray(train_targets, np.float32)
    k = min(k, len(train_n))
    out = np.zeros((len(test_n), targets.shape[1]), np.float32)
    for start in range(0, len(test_n), chunk):
        sim = test_n[start:start + chunk] @ train_n.T
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
        votes = np.einsum("nk,nkc->nc", weights, targets[nearest])
        out[start:start + chunk] = votes / weights.sum(1, keepdims=True)
    return out


@protocols.register("knn", inputs=feature_splits, features=frozen_features, deterministic=True)
def _scores(config: ml_collections.ConfigDict, row: protocols.Row) -> protocols.Scores:
    f = row.key["feature"]
    labels = row.train.labels
    targets = one_hot(labels, len(row.dataset.label_names)) if row.dataset.task == "multiclass" else labels
    return protocols.Scores(knn_scores(row.train.features[f], targets, row.test.features[f],
                                       config.knn.k, config.knn.temperature))
