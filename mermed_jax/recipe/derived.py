"""Values that follow from the recipe's keys, computed where used and never stored in a config.

A stored derived value goes stale the moment a flag changes what it was derived from
(`--config.global_batch=512` after `get_config` ran): every epoch-based schedule was then off.
"""

import math

import ml_collections


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Optimiser steps in one pass over num_train_images at global_batch images per step."""
    return math.ceil(config.num_train_images / config.global_batch)


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Steps that the schedules span: all epochs (config.max_steps may stop the job earlier)."""
    return config.epochs * steps_per_epoch(config)
