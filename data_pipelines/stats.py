"""Per-modality pixel statistics measured on the user's shards, pooled over datasets.

The converter records each split's mean/std in the manifest; `measured_stats(dirs)` pools them
per modality (weighted by record count). Modalities without data take the fallback table
(normalization.py), so a run's statistics always cover every modality.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np

from data_pipelines import normalization
from data_pipelines.manifest import Split, load_manifest, pooled_stats
from data_pipelines.modalities import modality_id


def _splits(dirs: Sequence[str | os.PathLike], split: str) -> list[tuple[str, str, Split]]:
    """(directory, modality, its `split`) of each dataset directory, naming a directory that lacks the split."""
    out = []
    for directory in dirs:
        manifest = load_manifest(directory)
        if split not in manifest.splits:
            raise KeyError(f"{directory}: no split {split!r}; has {sorted(manifest.splits)}")
        out.append((str(directory), manifest.modality, manifest.splits[split]))
    return out


def measured_stats(
    dirs: Sequence[str | os.PathLike], split: str = "train", fallback: str = "official"
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [NUM_MODALITIES, 3] mean and std, on pixel / 255: the manifests' `split`
    statistics of `dirs` pooled per modality (grey datasets count for all three channels), the
    `fallback` table's rows for modalities without data."""
    mean, std = normalization.table(fallback)
    per_modality = collections.defaultdict(list)
    for directory, modality, s in _splits(dirs, split):
        s = dataclasses.replace(s, mean=normalization.rgb(s.mean, directory), std=normalization.rgb(s.std, directory))
        per_modality[modality_id(modality)].append(s)
    for m, splits in per_modality.items():
        m_mean, m_std = pooled_stats(splits)
        if m_mean:
            mean[m], std[m] = m_mean, m_std
    return mean, std


def split_size(dirs: Sequence[str | os.PathLike], split: str = "train") -> int:
    """Records in `split` over all `dirs` (the training set's size when num_train_images is unset)."""
    return sum(s.num_records for _, _, s in _splits(dirs, split))
