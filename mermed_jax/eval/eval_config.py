"""The base of every eval config (configs/eval_*.py start from `eval_recipe()` and change what they
need), with the official downstream numbers as defaults, and its validation."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mermed_jax.eval import protocols
from mermed_jax.eval.encoders import NORMALIZATIONS
from mermed_jax.eval.features import NETWORK_FEATURES
from mermed_jax.eval.protocols.linear_probe import DEFAULT_CS
from mermed_jax.models.precision import PRECISIONS


def _own_fractions() -> dict:
    """A protocol section's `label_fractions` key, unset (the sweep's apply); a new placeholder per
    section, as ml_collections links every use of one."""
    return dict(label_fractions=config_dict.placeholder(tuple))


def eval_recipe() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "eval"  # results go to WORKDIR/eval/<name> unless --eval_dir says otherwise
    c.datasets = ml_collections.ConfigDict()  # name -> converted dataset directory
    # "latest", "all", or a tuple of steps; --step and --watch override.
    c.checkpoints = "latest"
    c.baselines = ("random", "pixels")  # floors shown beside every number
    c.protocols = ("linear", "knn")  # names registered in mermed_jax/eval/protocols/
    c.features = ("cls",)  # frozen features for linear/kNN: any of features.NETWORK_FEATURES
    c.label_fractions = (1.0,)  # a protocol's section may set its own (e.g. finetune.label_fractions)
    c.seeds = (0, 1, 42, 123, 2025)
    c.normalization = "pretrain"  # the run's saved per-modality statistics (run.json), "official" or "imagenet"
    c.pixel_size = 16  # raw-pixel baseline: images area-downsampled to pixel_size^2 x 3
    c.data = ml_collections.ConfigDict(dict(image_size=224, crop_fraction=0.875, batch_size=128, read_threads=2))
    # Used only for datasets without train/val/test (stratified, as the official evaluation).
    c.splits = ml_collections.ConfigDict(dict(fractions=(0.7, 0.15, 0.15), seed=42))
    c.linear = ml_collections.ConfigDict(dict(cs=DEFAULT_CS, max_iter=1000, **_own_fractions()))
    c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, **_own_fractions()))
    c.finetune = ml_collections.ConfigDict(dict(
        image_size=224, crop_fraction=0.875, batch_size=64, epochs=50, warmup_epochs=10,
        max_steps=config_dict.placeholder(int),  # stop early (the schedule still spans all epochs)
        base_lr=5e-3, min_lr=1e-6, layer_decay=0.65, weight_decay=0.05, drop_path=0.2,
        label_smoothing=0.1, erase_prob=0.25, randaug_ops=2, randaug_magnitude=9.0, **_own_fractions(),
    ))
    # The precision policy (models/precision.py) of feature extraction and fine-tuning: exact
    # arithmetic by default, as evaluation is a small share of the compute; "mixed" fine-tunes faster.
    c.precision = "float32"
    c.bootstrap = ml_collections.ConfigDict(dict(resamples=1000, seed=0))
    c.plots = True
    c.watch = ml_collections.ConfigDict(dict(poll_seconds=60.0, idle_timeout_seconds=3600.0))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Errors name the key, before anything is loaded."""
    if not config.datasets:
        raise ValueError("datasets: no dataset given (name -> converted dataset directory)")
    for p in config.protocols:
        protocols.get(p)  # an unknown name raises, listing the registered ones
    for f in config.features:
        if f not in NETWORK_FEATURES:
            raise ValueError(f"features: {f!r} is not one of {NETWORK_FEATURES}")
    for b in config.baselines:
        if b not in ("random", "pixels"):
            raise ValueError(f"baselines: {b!r} is not one of ('random', 'pixels')")
    if config.get("precision") not in PRECISIONS:
        raise ValueError(f"precision: {config.get('precision')!r} is not one of {PRECISIONS}")
    if "dtype" in config.finetune:
        raise ValueError("finetune.dtype: replaced by the top-level precision (float32, mixed or bfloat16)")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: {config.normalization!r} is not one of {NORMALIZATIONS}")
    for key, fractions in [("label_fractions", config.label_fractions)] + [
            (f"{p}.label_fractions", config[p].label_fractions) for p in config.protocols
            if p in config and config[p].get("label_fractions")]:
        for fraction in fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"{key}: {fraction} is not in (0, 1]")
    if not config.seeds:
        raise ValueError("seeds: give at least one seed")
    checkpoints = config.checkpoints
    if not (checkpoints in ("latest", "all") or all(isinstance(s, int) for s in checkpoints)):
        raise ValueError(f"checkpoints: {checkpoints!r}: expected 'latest', 'all' or a tuple of steps")
