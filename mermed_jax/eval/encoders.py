"""What is evaluated: the teacher backbone of an Orbax checkpoint, an exported file, a randomly
initialised network of the same shape (the floor every number is shown beside), or raw pixels.

An Encoder carries everything feature extraction needs (architecture, parameters, the per-modality
pixel statistics the network was trained with) and a tag that names it in caches and results, so
the rest of the evaluation never asks where the weights came from.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from data_pipelines import normalization as normalization_tables
from data_pipelines import stats, storage
from mermed_jax.models import networks
from mermed_jax.models.vit import ViT, ViTConfig
from mermed_jax.training import checkpointing, run_record

PIXELS = "pixels"
RANDOM = "random"
NORMALIZATIONS = ("pretrain", "official", "imagenet")


@dataclasses.dataclass(frozen=True)
class Encoder:
    tag: str  # "step_000040", "random", "pixels", "export_<name>": a cache and results key
    kind: str  # "checkpoint", "export", RANDOM or PIXELS
    config: ViTConfig | None  # None for raw pixels
    params: Any
    pixel_mean: np.ndarray  # [NUM_MODALITIES, 3], for pixels / 255
    pixel_std: np.ndarray


def checkpoint_tag(step: int) -> str:
    return f"step_{step:06d}"


def tag_step(tag: str) -> int | None:
    """The step of a checkpoint encoder's tag ("step_000600", or "step_000600_mixed" under another
    policy: `with_precision`), else None."""
    parts = tag.split("_")
    return int(parts[1]) if parts[0] == "step" and len(parts) > 1 and parts[1].isdigit() else None


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints of a pretraining workdir, ascending."""
    checkpointing.check_workdir(workdir, "a workdir to read checkpoints from", writable=False)
    return checkpointing.complete_steps(checkpointing.checkpoint_dir(workdir))


def pixel_statistics(workdir: str | os.PathLike, pretrain_config: ml_collections.ConfigDict,
                     normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-modality pixel mean/std to evaluate with: 'pretrain', those the run was trained
    with (its run record; the training data need not be here); or a fixed table, 'official'
    (MerMED-FM's constants) or 'imagenet'."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: expected one of {NORMALIZATIONS}")
    if normalization != "pretrain":
        return normalization_tables.table(normalization)
    record = run_record.load(workdir)
    if record is not None:
        return record.stats()
    # A workdir written before runs saved their record: its training measured the data's statistics.
    dirs = tuple(pretrain_config.data.dirs)
    missing = [d for d in dirs if not storage.exists(d)]
    if missing:
        raise FileNotFoundError(
            f"normalization='pretrain': {storage.join(workdir, run_record.RUN_RECORD)} does not exist (a run "
            f"from before run records) and its data.dirs {missing} are not here to measure; run from the "
            f"pretraining directory or set normalization to 'official' or 'imagenet'")
    logging.warning("%s has no %s (written before run records): measuring the statistics of its data.dirs, "
                    "as its training did", workdir, run_record.RUN_RECORD)
    return stats.measured_stats(dirs, pretrain_config.data.split, fallback="imagenet")


def eval_vit_config(pretrain_config: ml_collections.ConfigDict) -> ViTConfig:
    """The teacher's architecture, in fp32 (evaluation sets its own policy: `with_precision`)."""
    return dataclasses.replace(networks.backbone_config(pretrain_config, teacher=True), precision="float32")


def with_precision(encoder: Encoder, precision: str) -> Encoder:
    """`encoder` computing under a precision policy (models/precision.py); raw pixels have none.
    A policy other than float32 is part of the tag, so that results and caches of one policy are
    never taken for another's."""
    if encoder.config is None:
        return encoder
    tag = encoder.tag if precision == "float32" else f"{encoder.tag}_{precision}"
    return dataclasses.replace(encoder, tag=tag, config=dataclasses.replace(encoder.config, precision=precision))


def from_checkpoint(workdir: str | os.PathLike, step: int | None, normalization: str = "pretrain") -> Encoder:
    """The teacher backbone of a checkpoint (step None: the latest complete one), read alone: the
    optimiser, student and memory stay on disk."""
    teacher, config, step = checkpointing.load_teacher(workdir, step)
    mean, std = pixel_statistics(workdir, config, normalization)
    params = jax.device_get(teacher["teacher_params"]["backbone"])
    return Encoder(checkpoint_tag(step), "checkpoint", eval_vit_config(config), params, mean, std)


def random_init(like: Encoder, seed: int = 0) -> Encoder:
    """A network of `like`'s architecture and pixel statistics with freshly initialised weights."""
    if like.config is None:
        raise ValueError("random_init needs a network encoder to copy the architecture of, not raw pixels")
    size = like.config.img_size
    variables = ViT(like.config).init(jax.random.key(seed), np.zeros((1, size, size, 3), np.float32), train=False)
    params = jax.device_get(nn.unbox(variables["params"]))
    return Encoder(RANDOM if seed == 0 else f"{RANDOM}_seed{seed}", RANDOM, like.config, params,
                   like.pixel_mean, like.pixel_std)


def raw_pixels(like: Encoder) -> Encoder:
    """The raw-pixel baseline (features are downsampled, normalised pixels)."""
    return Encoder(PIXELS, PIXELS, None, None, like.pixel_mean, like.pixel_std)


def from_export(path: str | os.PathLike) -> Encoder:
    """An exported backbone (msgpack, safetensors or .pth with its config JSON), through the
    interop package's loader, which carries the export's own pixel statistics."""
    from mermed_jax.interop.exported_encoder import (
        load_encoder,  # the export format is the interop package's
    )

    loaded = load_encoder(path)
    logging.info("loaded exported encoder %s", path)
    return Encoder(f"export_{storage.path(path).stem}", "export", loaded.config, loaded.params,
                   np.asarray(loaded.pixel_mean, np.float32), np.asarray(loaded.pixel_std, np.float32))
