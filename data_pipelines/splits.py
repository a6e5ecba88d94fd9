"""Stratified, seeded splits that keep every patient (group) in one split.

Groups are split per stratum (the most common first label among a group's items), so each
split gets about the same class mix; a group never straddles splits, so no patient is in both
train and test. Unlabelled items form one stratum.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def parse_fractions(spec: str) -> dict[str, float]:
    """"train=0.8,val=0.1,test=0.1" -> dict; fractions must be positive and sum to 1."""
    fractions = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        try:
            fractions[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"split fraction {part!r}: expected NAME=FRACTION") from None
    if any(v <= 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be positive and sum to 1")
    return fractions


def assign_splits(
    labels: Sequence[tuple[int, ...]],
    groups: Sequence[str],
    fractions: Mapping[str, float],
    seed: int,
) -> list[str]:
    """The split name of every item; items of one group share a split."""
    members: dict[str, list[int]] = collections.defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    strata: dict[int, list[str]] = collections.defaultdict(list)
    for group in sorted(members):
        first = collections.Counter(labels[i][0] if labels[i] else -1 for i in members[group])
        strata[min(first, key=lambda lab: (-first[lab], lab))].append(group)
    rng = np.random.default_rng(seed)
    names = list(fractions)
    bounds = np.cumsum([fractions[n] for n in names])
    out = [""] * len(groups)
    for stratum in sorted(strata):
        ordered = [strata[stratum][j] for j in rng.permutation(len(strata[stratum]))]
        ends = np.rint(bounds * len(ordered)).astype(int)
        start = 0
        for name, end in zip(names, ends):
            for group in ordered[start:end]:
                for i in members[group]:
                    out[i] = name
            start = end
    return out
