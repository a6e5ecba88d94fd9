"""Per-modality normalisation constants for the train step's on-device normalisation.

Batches travel as uint8 (4x less host-to-device traffic than float32); the train step
(mermed_jax.training.train_step.normalize_crops) turns them into (x / 255 - mean[modality]) /
std[modality] with the arrays returned here. No per-modality statistics from the MerMED-FM
paper were at hand, so the defaults are ImageNet's for every modality (the usual torchvision
Normalize of DINO-lineage code); `modality_stats(dirs)` replaces them with the statistics the
converter measured, pooled per modality over the datasets given.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from data_pipelines import records
from data_pipelines.manifest import pooled_stats
from data_pipelines.modalities import NUM_MODALITIES, modality_id

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rgb(values: Sequence[float], where: str) -> tuple[float, ...]:
    if len(values) == 1:
        return tuple(values) * 3
    if len(values) != 3:
        raise ValueError(f"{where}: expected 1 or 3 channel statistics, got {len(values)}")
    return tuple(values)


def modality_stats(
    dirs: Sequence[str | os.PathLike] = (),
    split: str = "train",
    overrides: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [NUM_MODALITIES, 3] mean and std, on pixel / 255.

    ImageNet values, then the manifests' `split` statistics of `dirs` pooled per modality
    (weighted by record count; grey datasets count for all three channels), then `overrides`
    ({modality name: (mean, std)}).
    """
    mean = np.tile(np.asarray(IMAGENET_MEAN, np.float32), (NUM_MODALITIES, 1))
    std = np.tile(np.asarray(IMAGENET_STD, np.float32), (NUM_MODALITIES, 1))
    per_modality = collections.defaultdict(list)
    for directory in dirs:
        manifest = records.load_manifest(directory)
        if split not in manifest.splits:
            raise KeyError(f"{directory}: no split {split!r}; has {sorted(manifest.splits)}")
        s = manifest.splits[split]
        s = dataclasses.replace(s, mean=_rgb(s.mean, str(directory)), std=_rgb(s.std, str(directory)))
        per_modality[modality_id(manifest.modality)].append(s)
    for m, splits in per_modality.items():
        m_mean, m_std = pooled_stats(splits)
        if m_mean:
            mean[m], std[m] = m_mean, m_std
    for name, (m_mean, m_std) in (overrides or {}).items():
        mean[modality_id(name)] = _rgb(m_mean, f"override {name}")
        std[modality_id(name)] = _rgb(m_std, f"override {name}")
    return mean, std
