"""Values that follow from the recipe's keys, computed where used and never stored in a config.

A stored derived value goes stale the moment a flag changes what it was derived from
(`--config.global_batch=512` after `get_config` ran): every epoch-based schedule was then off.
A run saves the values it started with (training/run_record.py) and keeps them on resume.
Steps per epoch is ceil(images / global_batch), a deliberate, documented difference from the
official sampler's per-GPU count (see steps_per_epoch).
"""

import math

import ml_collections

from data_pipelines import stats


def train_images(config: ml_collections.ConfigDict) -> int:
    """Images per epoch: num_train_images, or the record count of data.split over data.dirs."""
    if config.num_train_images is not None:
        return config.num_train_images
    if not config.data.dirs:
        raise ValueError("num_train_images: unset, and data.dirs names no dataset whose records to count")
    return stats.split_size(config.data.dirs, config.data.split)


def steps_per_epoch(config: ml_collections.ConfigDict, images: int | None = None) -> int:
    """Optimiser steps in one "epoch" of `images` (default: train_images(config)): ceil(N / global_batch).

    An epoch is a step count, not a pass: the balanced sampler draws every step from infinite
    per-modality streams (data_pipelines/sampler.py), so a small modality is seen many times per
    epoch and a large one less than once; an epoch is only "N images' worth of steps". The
    official sampler (datasets.py, AllClassesImbalancedSampler) works the same way and sets
    batches_per_epoch = sum over modalities m of floor(n_m / world_size), // batch_size_per_gpu.
    We keep ceil(N / global_batch) on purpose: (1) the official count depends on the number of
    GPUs (each modality is floored per rank), ours only on the recipe, so one recipe gives the
    same schedules on every mesh (as the memory layout does, ssl/memory.py), and it needs one
    number (num_train_images), not per-modality counts; (2) the two differ by little: with
    G = world_size x batch_size_per_gpu and M modalities, official is in
    (N/G - M/batch_size_per_gpu - 1, N/G] and ours in [N/G, N/G + 1), so ours is more by 0 to 2 steps when batch_size_per_gpu >= M (fewer than 2 + M /
    batch_size_per_gpu in general; the paper's N = 3.3M at G = 1024: 3223 here, 3222 there on 8,
    4 or 64 GPUs); (3) ceil never gives 0 steps when N < global_batch (the official sampler then
    yields no batch at all).
    """
    return math.ceil((train_images(config) if images is None else images) / config.global_batch)


def total_steps(config: ml_collections.ConfigDict, per_epoch: int | None = None) -> int:
    """Steps that the schedules span: all epochs (config.max_steps may stop the job earlier)."""
    return config.epochs * (steps_per_epoch(config) if per_epoch is None else per_epoch)
