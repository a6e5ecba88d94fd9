"""Values that follow from the recipe's keys, computed where used and never stored in a config.

A stored derived value goes stale the moment a flag changes what it was derived from
(`--config.global_batch=512` after `get_config` ran): every epoch-based schedule was then off.
A run saves the values it started with (training/run_record.py) and keeps them on resume.
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
    """Optimiser steps in one pass over `images` (default: train_images(config)) at global_batch."""
    return math.ceil((train_images(config) if images is None else images) / config.global_batch)


def total_steps(config: ml_collections.ConfigDict, per_epoch: int | None = None) -> int:
    """Steps that the schedules span: all epochs (config.max_steps may stop the job earlier)."""
    return config.epochs * (steps_per_epoch(config) if per_epoch is None else per_epoch)
