"""What a run fixed at its first start and keeps for life: its input contract and its length.

The per-modality pixel statistics are part of the model's input contract, and steps per epoch
set every epoch-based schedule. Both used to be recomputed from the data at every start, so a
resume after `data.dirs` changed silently renormalised the inputs or stretched the schedules,
and evaluating a checkpoint needed the training data mounted. The first start now writes them to
WORKDIR/run.json; resume, evaluation and export read them from there. A resume whose config or
data would now give other values logs a warning and keeps the saved ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from data_pipelines import normalization, stats, storage
from mermed_jax.recipe import derived

RUN_RECORD = "run.json"
# The source recorded for a run that started before records: measured, ImageNet where absent.
LEGACY_SOURCE = "measured (imagenet for absent modalities; a run from before run records)"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    pixel_mean: tuple[tuple[float, float, float], ...]  # [NUM_MODALITIES][3], on pixel / 255
    pixel_std: tuple[tuple[float, float, float], ...]
    pixel_stats_source: str  # "official", "measured" or "imagenet" ("+given" when rows were given), or LEGACY_SOURCE
    train_images: int
    steps_per_epoch: int
    total_steps: int

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.pixel_mean, np.float32), np.asarray(self.pixel_std, np.float32)


def pixel_stats(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, str]:
    """mean, std [NUM_MODALITIES, 3] and their source, as config.pixel_stats asks."""
    source = config.pixel_stats.source
    if source == "measured":
        mean, std = stats.measured_stats(config.data.dirs, config.data.split)
    else:
        mean, std = normalization.table(source)
    given = config.pixel_stats.given
    if given:
        mean, std = normalization.with_given(mean, std, {k: tuple(v) for k, v in dict(given).items()})
        source = f"{source}+given"
    return mean, std, source


def plan(config: ml_collections.ConfigDict) -> RunRecord:
    """The record a run of this config would start with now."""
    mean, std, source = pixel_stats(config)
    images = derived.train_images(config)
    per_epoch = derived.steps_per_epoch(config, images)
    return RunRecord(
        pixel_mean=_rows(mean), pixel_std=_rows(std), pixel_stats_source=source, train_images=images, steps_per_epoch=per_epoch,
        total_steps=derived.total_steps(config, per_epoch),
    )


def _rows(array: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in array)


def load(workdir: str | os.PathLike) -> RunRecord | None:
    """The saved record, or None for a new workdir or one written before records existed."""
    path = storage.join(workdir, RUN_RECORD)
    if not storage.exists(path):
        return None
    try:
        fields = json.loads(storage.read_text(path))
        return RunRecord(**{k: _tuples(v) for k, v in fields.items()})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a run record ({e}); it holds the run's input statistics and "
                         f"length: restore it from a copy rather than delete it") from None


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def settle(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *, resuming: bool) -> RunRecord:
    """The run's record: the saved one on resume (with a warning for every value the config or
    data would now change), else a fresh one, written by process 0.

    A run resumed from a workdir written before records existed (`resuming` and no record) was
    trained on its data's measured statistics with ImageNet's for absent modalities, whatever
    pixel_stats says: its record is made from those, so the resumed steps see the same inputs.
    """
    fresh = plan(config)
    saved = load(workdir)
    if saved is None and resuming:
        mean, std = stats.measured_stats(config.data.dirs, config.data.split, fallback="imagenet")
        fresh = dataclasses.replace(fresh, pixel_mean=_rows(mean), pixel_std=_rows(std),
                                    pixel_stats_source=LEGACY_SOURCE)
        logging.warning("%s has checkpoints but no %s (written before run records): keeping the statistics "
                        "its training measured on data.dirs", workdir, RUN_RECORD)
    if saved is None:
        if jax.process_index() == 0:
            storage.write_text(storage.join(workdir, RUN_RECORD), json.dumps(dataclasses.asdict(fresh), indent=1))
        logging.info("run record: %d training images, %d steps per epoch, %d steps, pixel statistics: %s",
                     fresh.train_images, fresh.steps_per_epoch, fresh.total_steps, fresh.pixel_stats_source)
        return fresh
    for field in dataclasses.fields(RunRecord):
        old, new = getattr(saved, field.name), getattr(fresh, field.name)
        if old != new:
            logging.warning("run record: the config and data now give %s=%s, but the run started with %s; "
                            "keeping the run's value (%s)", field.name, _short(new), _short(old), RUN_RECORD)
    return saved


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
