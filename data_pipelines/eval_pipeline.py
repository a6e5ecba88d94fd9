"""Grain evaluation pipeline: centre crops, labels kept, one exact pass, last batch padded.

Records are taken in manifest order (datasets in `dirs` order, shards in order, records in
file order); each host takes a contiguous share of them. Every host yields the same number of
batches, ceil(largest share / batch_size), so multi-host evaluation steps stay in lockstep;
padding rows are zeros with valid=False. A batch:
    image     uint8 [B, S, S, 3]   resize short side to S / crop_fraction, centre S x S
    labels    int32 [B, C] multi-hot over the manifest's label names (labels="multi_hot"), or
              int32 [B, K] label indices padded with -1 (labels="index"; K = 1 for single-label
              datasets, C for multi-label ones)
    modality  int32 [B]
    valid     bool [B]

Configuration (`EvalConfig`, or `EvalConfig.from_config(section)` with the same field names):
dirs (dataset directories with a manifest.json, which gives label names and modality; local paths
or gs:// / s3:// URLs), split ("test"), batch_size (per host), image_size (224), crop_fraction (0.875), labels,
skip_corrupt (False: a bad record raises CorruptRecordError naming file and offset; True: its
row comes back with valid=False and a logged warning, and records lost to a truncated shard are
logged and left out), read_threads.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import grain
import jax
import numpy as np

from data_pipelines import record_source, records
from data_pipelines.modalities import modality_id
from data_pipelines.multicrop import center_crop

LABEL_MODES = ("multi_hot", "index")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    dirs: tuple[str, ...]
    split: str = "test"
    batch_size: int = 256
    image_size: int = 224
    crop_fraction: float = 0.875
    labels: str = "multi_hot"
    skip_corrupt: bool = False
    read_threads: int = 2

    def __post_init__(self):
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        if not self.dirs:
            raise ValueError("dirs names no dataset directory")

    @classmethod
    def from_config(cls, section: Any) -> EvalConfig:
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"eval config: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class _Records:
    files: tuple[str, ...]
    file_modality: np.ndarray  # int32 per file
    file_ids: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray


def _all_records(cfg: EvalConfig) -> tuple[_Records, int, bool]:
    """Every record of the split in manifest order, the label count and whether any is multi-label."""
    files, modalities, file_ids, extents = [], [], [], []
    label_names = None
    multi_label = False
    for directory in cfg.dirs:
        manifest = records.load_manifest(directory)
        if label_names is not None and manifest.label_names != label_names:
            raise ValueError(f"{directory}: label names {manifest.label_names} differ from the first "
                             f"dataset's {label_names}; evaluate label spaces separately")
        label_names = manifest.label_names
        multi_label |= manifest.multi_label
        for shard in record_source.manifest_shard_files(manifest, cfg.split):
            found = record_source.index_shard(shard, cfg.skip_corrupt)
            file_ids.append(np.full(len(found) - 1, len(files), np.int32))
            extents.append(found)
            files.append(shard.path)
            modalities.append(modality_id(manifest.modality))
    recs = _Records(tuple(files), np.asarray(modalities, np.int32),
                    np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32),
                    np.concatenate([e[:-1] for e in extents]) if extents else np.zeros(0, np.int64),
                    np.concatenate([np.diff(e) for e in extents]) if extents else np.zeros(0, np.int64))
    return recs, len(label_names or ()), multi_label


class _EvalBatchMaker:
    def __init__(self, cfg: EvalConfig, recs: _Records, lo: int, hi: int, num_classes: int, multi_label: bool):
        self.cfg, self.recs, self.lo, self.hi = cfg, recs, lo, hi
        self.num_classes = num_classes
        self.label_width = num_classes if cfg.labels == "multi_hot" or multi_label else 1
        self.reader = record_source.RecordReader()

    def _labels(self, labels: np.ndarray, path: str, offset: int) -> np.ndarray:
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise records.CorruptRecordError(path, offset, f"labels {labels.tolist()} outside "
                                             f"[0, {self.num_classes}) of the manifest's label names")
        if self.cfg.labels == "multi_hot":
            row = np.zeros(self.num_classes, np.int32)
            row[labels] = 1
            return row
        if labels.size > self.label_width:
            raise records.CorruptRecordError(path, offset, f"{labels.size} labels in a single-label dataset")
        return np.pad(labels.astype(np.int32), (0, self.label_width - labels.size), constant_values=-1)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        b, size = self.cfg.batch_size, self.cfg.image_size
        batch = {
            "image": np.zeros((b, size, size, 3), np.uint8),
            "labels": np.full((b, self.label_width), 0 if self.cfg.labels == "multi_hot" else -1, np.int32),
            "modality": np.zeros((b,), np.int32),
            "valid": np.zeros((b,), bool),
        }
        rows = range(self.lo + index * b, min(self.lo + (index + 1) * b, self.hi))
        extents = [(self.recs.files[self.recs.file_ids[r]], int(self.recs.offsets[r]), int(self.recs.sizes[r]))
                   for r in rows]
        fetched = self.reader.fetch(extents)  # the batch's bucket records, requested all at once
        for row, (r, (path, offset, nbytes)) in enumerate(zip(rows, extents)):
            file_id = self.recs.file_ids[r]
            try:
                example, image = self.reader.read_image(path, offset, nbytes, fetched)
                batch["labels"][row] = self._labels(example["labels"], path, offset)
            except records.CorruptRecordError as error:
                if not self.cfg.skip_corrupt:
                    raise
                logging.warning("masking bad record (skip_corrupt=True): %s", error)
                continue
            batch["image"][row] = center_crop(image, size, self.cfg.crop_fraction)
            batch["modality"][row] = self.recs.file_modality[file_id]
            batch["valid"][row] = True
        return batch


def eval_dataset(cfg: EvalConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """One pass over this host's share of the split, in order, as padded batches."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    recs, num_classes, multi_label = _all_records(cfg)
    bounds = np.linspace(0, len(recs.offsets), process_count + 1).round().astype(np.int64)
    largest = int(np.diff(bounds).max())
    num_batches = -(-largest // cfg.batch_size)
    maker = _EvalBatchMaker(cfg, recs, int(bounds[process_index]), int(bounds[process_index + 1]),
                            num_classes, multi_label)
    return grain.MapDataset.range(num_batches).map(maker).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=max(1, cfg.read_threads)))


def eval_batches(cfg: EvalConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Iterator of eval batches; host arguments default to jax's."""
    return iter(eval_dataset(cfg, process_index=process_index, process_count=process_count))
