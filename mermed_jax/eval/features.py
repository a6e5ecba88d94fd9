"""Frozen features of one dataset split: CLS and mean-pooled patch tokens of an encoder, DINO's
multi-block features (or raw pixels), extracted data-parallel over the devices through the evaluation pipeline and cached on
disk per encoder, dataset and split.

Probes run many times over one extraction (C grids, label fractions, seeds), so features are
computed once: EVAL_DIR/features/<encoder tag>/<dataset>/<split>.npz. The file records what it was
computed from (dataset, split, record count, image size and crop); a cache that does not match is
recomputed rather than trusted (weights are part of what it records: a rerun pretraining reuses
step numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import eval_pipeline, records, storage
from mermed_jax import sharding
from mermed_jax.eval import npz
from mermed_jax.eval.encoders import PIXELS, Encoder
from mermed_jax.models.vit import ViT, ViTConfig
from mermed_jax.preprocess import normalize_images

# multiblock: the CLS tokens of the last MULTIBLOCK_DEPTH blocks and the mean patch token, each
# through the final norm, concatenated (DINO's and DINOv2's linear-probe features): the earlier
# blocks keep the local texture a small pretraining run's last block has not yet abstracted away.
NETWORK_FEATURES = ("cls", "patch_mean", "multiblock")
MULTIBLOCK_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    features: dict[str, np.ndarray]  # name -> [N, D]: cls and patch_mean, or pixels
    labels: np.ndarray  # [N] class indices, or [N, C] multi-hot for multi-label sets
    modality: np.ndarray  # [N] int32

    def take(self, idx: np.ndarray) -> FeatureSet:
        """The rows `idx` of every array: a label-fraction subset, or one part of a made split."""
        return FeatureSet({k: v[idx] for k, v in self.features.items()}, self.labels[idx], self.modality[idx])


@functools.lru_cache(maxsize=8)
def _forward(config: ViTConfig, mesh: jax.sharding.Mesh):
    """jit of normalise + ViT, batch split over the mesh's data axes, parameters replicated."""
    model = ViT(config)
    batch, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def forward(params, image, modality, mean, std):
        out = model.apply({"params": params}, normalize_images(image, modality, mean, std), train=False)
        blocks = out["block_cls"][:, -MULTIBLOCK_DEPTH:]
        multiblock = jnp.concatenate([blocks.reshape(blocks.shape[0], -1), out["patch_mean"]], axis=1)
        return {"cls": out["cls"], "patch_mean": out["patch_mean"], "multiblock": multiblock}

    return jax.jit(forward, in_shardings=(repl, batch, batch, repl, repl), out_shardings=batch)


def _pixel_features(images: np.ndarray, modality: np.ndarray, encoder: Encoder, size: int) -> np.ndarray:
    """Area-downsampled images, normalised per modality, flattened: the raw-pixel baseline."""
    small = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
    x = np.asarray(normalize_images(small, modality, encoder.pixel_mean, encoder.pixel_std))
    return x.reshape(len(x), -1)


def extract(encoder: Encoder, data: eval_pipeline.EvalConfig, mesh: jax.sharding.Mesh,
            pixel_size: int = 16) -> FeatureSet:
    """One pass over the split; padding rows are dropped. Every host gets every row."""
    manifest = records.load_manifest(data.dirs[0])
    devices = sharding.num_batch_shards(mesh)
    if data.batch_size % devices:
        raise ValueError(f"eval batch_size={data.batch_size} is not a multiple of the {devices} data-parallel devices")
    if data.labels != "multi_hot":
        raise ValueError("feature extraction reads labels as multi_hot (labels are converted afterwards)")
    batch_sharding = sharding.batch_sharding(mesh)
    params = mean = std = None
    if encoder.kind != PIXELS:
        repl = sharding.replicated(mesh)
        params = jax.device_put(encoder.params, repl)
        mean, std = jax.device_put(encoder.pixel_mean, repl), jax.device_put(encoder.pixel_std, repl)
    parts: dict[str, list[np.ndarray]] = {}
    with sharding.axis_rules_context(mesh):
        for host_batch in eval_pipeline.eval_batches(data):
            batch = sharding.to_global(host_batch, batch_sharding)
            if encoder.kind == PIXELS:
                out = {PIXELS: _pixel_features(host_batch["image"], host_batch["modality"], encoder, pixel_size)}
                out = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in out.items()}
            else:
                out = _forward(encoder.config, mesh)(params, batch["image"], batch["modality"], mean, std)
            out.update(labels=batch["labels"], modality=batch["modality"], valid=batch["valid"])
            for k, v in multihost_utils.process_allgather(out, tiled=True).items():
                parts.setdefault(k, []).append(np.asarray(v))
    if not parts:
        raise ValueError(f"{data.dirs[0]}: the {data.split!r} split has no records")
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    valid = rows.pop("valid")
    rows = {k: v[valid] for k, v in rows.items()}
    labels = _labels(rows.pop("labels"), manifest.multi_label, data)
    modality = rows.pop("modality").astype(np.int32)
    return FeatureSet({k: v.astype(np.float32) for k, v in rows.items()}, labels, modality)


def _labels(multi_hot: np.ndarray, multi_label: bool, data: eval_pipeline.EvalConfig) -> np.ndarray:
    """Multi-hot rows as they are for multi-label sets, else class indices (one label per record)."""
    if multi_label:
        return multi_hot.astype(np.int32)
    counts = multi_hot.sum(1)
    if (counts != 1).any():
        raise ValueError(f"{data.dirs[0]}: {int((counts != 1).sum())} records of the single-label "
                         f"{data.split!r} split do not carry exactly one label")
    return multi_hot.argmax(1).astype(np.int32)


def load_images(data: eval_pipeline.EvalConfig) -> FeatureSet:
    """The split's uint8 images (features["image"]) with labels, in pipeline order, on this host:
    what fine-tuning trains on."""
    manifest = records.load_manifest(data.dirs[0])
    parts: dict[str, list[np.ndarray]] = {}
    for batch in eval_pipeline.eval_batches(data, process_index=0, process_count=1):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v[batch["valid"]])
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    return FeatureSet({"image": rows["image"]}, _labels(rows["labels"], manifest.multi_label, data),
                      rows["modality"].astype(np.int32))


def _weights_digest(leaves: tuple[np.ndarray, ...]) -> str:
    digest = hashlib.sha256()
    for leaf in leaves:
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def _fingerprint(encoder: Encoder, data: eval_pipeline.EvalConfig, pixel_size: int) -> str:
    """What the features depend on, weights included (a rerun pretraining reuses step numbers)."""
    manifest = records.load_manifest(data.dirs[0])
    leaves = tuple(np.asarray(x) for x in jax.tree.leaves(encoder.params))
    return json.dumps(dict(
        encoder=encoder.tag, weights=_weights_digest(leaves) if leaves else None, dataset=str(manifest.directory), split=data.split,
        records=manifest.splits[data.split].num_records if data.split in manifest.splits else None,
        image_size=data.image_size, crop_fraction=data.crop_fraction,
        pixel_size=pixel_size if encoder.kind == PIXELS else None,
        precision=encoder.config.precision if encoder.config is not None else None,
    ), sort_keys=True)


def cached_features(cache_root: str | os.PathLike, encoder: Encoder, dataset: str, data: eval_pipeline.EvalConfig,
                    mesh: jax.sharding.Mesh, pixel_size: int = 16) -> FeatureSet:
    """Features from cache_root/<encoder tag>/<dataset>/<split>.npz (any location), extracted when
    absent or stale."""
    path = storage.join(cache_root, encoder.tag, dataset, f"{data.split}.npz")
    fingerprint = _fingerprint(encoder, data, pixel_size)
    if storage.exists(path):
        cached = npz.load(path)
        if str(cached["fingerprint"]) == fingerprint:
            names = [k for k in cached if k not in ("labels", "modality", "fingerprint")]
            return FeatureSet({k: cached[k] for k in names}, cached["labels"], cached["modality"])
        logging.warning("%s: cached features were computed from other inputs; recomputing", path)
    found = extract(encoder, data, mesh, pixel_size)
    if jax.process_index() == 0:
        npz.save(path, labels=found.labels, modality=found.modality, fingerprint=np.asarray(fingerprint), **found.features)
    return found
