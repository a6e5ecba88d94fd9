"""What protocols run on: one dataset's train/val/test splits, loaded for one encoder.

Splits: a dataset's own train/val/test when its manifest has them; otherwise every record it has is
split 70/15/15, stratified, with config.splits.seed (42), as the official evaluation does. Frozen
features come from here (`feature_splits`); a protocol that needs other inputs (fine-tuning's images)
writes a loader of the same `SplitLoader` signature on top of `three_splits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from data_pipelines import eval_pipeline, records, storage
from mermed_jax.eval import subsets
from mermed_jax.eval.encoders import PIXELS, Encoder
from mermed_jax.eval.features import FeatureSet, cached_features

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    directory: str
    modality: str
    label_names: tuple[str, ...]
    task: str  # "multiclass" or "multilabel"
    native_splits: bool  # the manifest has train, val and test


# (config, dataset, encoder, eval_dir, mesh) -> {"train", "val", "test"}: the sweep loads each loader
# once per encoder and dataset, so protocols naming the same loader share one load.
SplitLoader = Callable[[ml_collections.ConfigDict, Dataset, Encoder, str, jax.sharding.Mesh],
                       dict[str, FeatureSet]]


def describe(name: str, directory: str) -> Dataset:
    manifest = records.load_manifest(directory)
    return Dataset(name, str(directory), manifest.modality, manifest.label_names,
                   "multilabel" if manifest.multi_label else "multiclass",
                   all(s in manifest.splits for s in SPLITS))


def pipeline_config(config: ml_collections.ConfigDict, directory: str, split: str, image_size: int,
                    crop_fraction: float) -> eval_pipeline.EvalConfig:
    devices = jax.device_count()
    batch = -(-config.data.batch_size // devices) * devices  # a whole number of rows per device
    return eval_pipeline.EvalConfig(dirs=(directory,), split=split, batch_size=batch, image_size=image_size,
                                    crop_fraction=crop_fraction, labels="multi_hot",
                                    read_threads=config.data.read_threads)


def three_splits(config: ml_collections.ConfigDict, dataset: Dataset,
                 load: Callable[[str], FeatureSet]) -> dict[str, FeatureSet]:
    """train/val/test: the native splits, or a stratified split of all records (same order every load)."""
    if dataset.native_splits:
        return {s: load(s) for s in SPLITS}
    parts = [load(s) for s in sorted(records.load_manifest(dataset.directory).splits)]
    merged = FeatureSet({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
                        np.concatenate([p.labels for p in parts]), np.concatenate([p.modality for p in parts]))
    chosen = subsets.stratified_split(merged.labels, tuple(config.splits.fractions), config.splits.seed)
    return {name: merged.take(idx) for name, idx in zip(SPLITS, chosen)}


def feature_splits(config: ml_collections.ConfigDict, dataset: Dataset, encoder: Encoder, eval_dir: str,
                   mesh: jax.sharding.Mesh) -> dict[str, FeatureSet]:
    """Frozen features of every split, cached under eval_dir/features."""
    d = config.data
    return three_splits(config, dataset, lambda split: cached_features(
        storage.join(eval_dir, "features"), encoder, dataset.name,
        pipeline_config(config, dataset.directory, split, d.image_size, d.crop_fraction), mesh, config.pixel_size))


def frozen_features(config: ml_collections.ConfigDict, encoder: Encoder) -> tuple[str, ...]:
    """The features of `feature_splits` a frozen-feature protocol runs on: the configured ones, or
    the raw pixels of the pixel baseline (which has nothing else)."""
    return (PIXELS,) if encoder.kind == PIXELS else tuple(config.features)
