"""Per-modality pixel statistics that fix a model's input contract: the tables, written once.

A network is trained on (x / 255 - mean[modality]) / std[modality]; whoever feeds it later
(evaluation, an exported encoder, weights imported from the official release) must use the
same numbers. The official MerMED-FM code normalises each modality with fixed constants
(OFFICIAL, below, keyed by this project's modality names); ImageNet's are the usual choice of
DINO-lineage code and stay available. Statistics measured on a user's own shards are pooled in
stats.py. Kept to NumPy, so the train step's and the exporters' import paths stay light.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from data_pipelines.modalities import MODALITIES, modality_id

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# The official code's constants (mean; std), single values for grey modalities. Its names:
# cfp, oct, cxr, pathology -> path, CT -> ct, US -> us, skin -> derm.
OFFICIAL: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cfp": ((0.33781426, 0.21333193, 0.13285545), (0.29643703, 0.1900187, 0.13929177)),
    "oct": ((0.19832779,), (0.22167036,)),
    "cxr": ((0.50756656,), (0.31223216,)),
    "path": ((0.72139378, 0.60500935, 0.70543986), (0.24855434, 0.27136655, 0.24570293)),
    "ct": ((0.33009237,), (0.32522697,)),
    "us": ((0.14694033,), (0.1806314,)),
    "derm": ((0.66138601, 0.51889024, 0.47144768), (0.23963617, 0.21994001, 0.22855408)),
}

# Where a run's statistics come from (config key pixel_stats.source).
SOURCES = ("official", "measured", "imagenet")


def rgb(values: Sequence[float], where: str) -> tuple[float, ...]:
    """1 or 3 channel values -> 3 (grey modalities repeat their single value)."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"{where}: expected 1 or 3 channel statistics, got {len(values)}")
    return values


def table(source: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 [NUM_MODALITIES, 3] mean and std of a fixed table: 'official' or 'imagenet'."""
    if source == "imagenet":
        rows = {m: IMAGENET for m in MODALITIES}
    elif source == "official":
        rows = OFFICIAL
    else:
        raise ValueError(f"pixel statistics source {source!r}: a table is 'official' or 'imagenet'")
    mean = np.asarray([rgb(rows[m][0], m) for m in MODALITIES], np.float32)
    std = np.asarray([rgb(rows[m][1], m) for m in MODALITIES], np.float32)
    return mean, std


def with_given(mean: np.ndarray, std: np.ndarray,
               given: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None) -> tuple[np.ndarray, np.ndarray]:
    """Copies of mean/std with the rows of `given` ({modality name: (mean, std)}) replaced."""
    mean, std = mean.copy(), std.copy()
    for name, (m_mean, m_std) in (given or {}).items():
        mean[modality_id(name)] = rgb(m_mean, f"pixel_stats.given[{name!r}]")
        std[modality_id(name)] = rgb(m_std, f"pixel_stats.given[{name!r}]")
    if np.any(std <= 0):
        raise ValueError("pixel_stats: every std must be positive")
    return mean, std
