"""Stratified index subsets: label fractions of a training split, and the 70/15/15 split made for a
dataset that comes without one.

Strata are classes for single-label sets; for multi-label sets the first positive label (or "no
label"), an approximation of multi-label stratification that keeps every label's prevalence close
while staying simple enough to check by eye.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def strata(labels: np.ndarray) -> np.ndarray:
    """One stratum id per example: the class index, or for multi-hot rows the first positive
    label (C when none)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels.astype(np.int64)
    return np.where(labels.any(1), labels.argmax(1), labels.shape[1]).astype(np.int64)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of about `fraction` of the examples, the same fraction of every stratum
    (at least one example each, so a 1% subset still sees every class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction}: expected a value in (0, 1]")
    ids = strata(labels)
    if fraction == 1:
        return np.arange(len(ids))
    rng = np.random.default_rng(seed)
    chosen = []
    for s in np.unique(ids):
        members = np.flatnonzero(ids == s)
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 42) -> list[np.ndarray]:
    """Disjoint sorted index sets, one per fraction, each stratum divided in the same proportions."""
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"split fractions {tuple(fractions)} must be positive and sum to 1")
    ids = strata(labels)
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for s in np.unique(ids):
        members = rng.permutation(np.flatnonzero(ids == s))
        ends = np.rint(bounds * len(members)).astype(int)
        for p, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
            parts[p].append(members[start:end])
    return [np.sort(np.concatenate(p)) for p in parts]
