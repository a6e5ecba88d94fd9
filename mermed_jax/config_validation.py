"""Checks a config before anything is compiled, with errors that name the key.

A pod job that dies in minute ten on a typo wastes a reservation: everything that can be known
from the config and the device count is checked here, first thing.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from mermed_jax import config_lib, sharding
from mermed_jax.models.vit import REMAT_POLICIES, parse_variant
from mermed_jax.ssl.memory import check_memory_config


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


_NUMBER = (int, float)


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in ("mixture",):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


# Keys the paper recipe leaves unset (None) that take a value of one type when set.
_OPTIONAL_TYPES: dict[str, type | tuple[type, ...]] = {
    "model.width": int, "model.depth": int, "model.num_heads": int, "model.mlp_dim": int,
    "steps_per_epoch": int, "max_steps": int, "checkpoint.keep_period": int,
    "model.layerscale_init": _NUMBER, "peak_tflops_per_device": _NUMBER, "init_checkpoint": str, "data.mixture": Mapping,
}
# Integer keys that may be 0 (all other integer keys are counts or sizes and must be positive).
_NON_NEGATIVE = {"data.worker_count", "crops.num_local", "model.num_registers", "profile.every_steps",
                 "optim.warmup_epochs", "loss.warmup_teacher_temp_epochs", "max_steps"}
_ANY_INT = {"seed"}


def _type_ok(value: Any, expected: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is no number and an int is a float (not the other way)."""
    if isinstance(value, bool):
        return expected is bool
    if expected is float or expected == _NUMBER:
        return isinstance(value, _NUMBER)
    return isinstance(value, expected)


def _check_keys_and_types(config: ml_collections.ConfigDict) -> None:
    """Every key known, every value of its key's type, finite and (for counts and sizes) positive.

    Anything that passes here can be compared and divided by the checks that follow: a None, a
    bool for a width or a NaN rate used to surface as a TypeError or ZeroDivisionError while
    building the model, after the job had started.
    """
    schema = _leaves(config_lib.paper_recipe().to_dict())
    given = _leaves(config.to_dict())
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown config key (unknown keys: {', '.join(unknown)})")
    for key, value in given.items():
        expected = schema[key]
        if expected is None:
            if value is None:
                continue
            kind = _OPTIONAL_TYPES.get(key)
            if kind is not None and not _type_ok(value, kind):
                raise ConfigError(f"{key}: expected {getattr(kind, '__name__', 'a number')} or None, got {type(value).__name__} {value!r}")
        elif value is None:
            raise ConfigError(f"{key}: must be set (got None; the recipe's value is {expected!r})")
        elif isinstance(expected, (tuple, list)):
            if not isinstance(value, (tuple, list)):
                raise ConfigError(f"{key}: expected a sequence, got {type(value).__name__} {value!r}")
            if key != "data.dirs" and (len(value) != len(expected) or not all(_type_ok(v, type(e)) for v, e in zip(value, expected))):
                raise ConfigError(f"{key}: expected {len(expected)} values like {tuple(expected)!r}, got {value!r}")
        elif not _type_ok(value, type(expected)):
            raise ConfigError(f"{key}: expected {type(expected).__name__}, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and key not in _ANY_INT:
            _require(value >= 0 if key in _NON_NEGATIVE else value > 0, key,
                     f"must be {'>= 0' if key in _NON_NEGATIVE else 'positive'}, got {value}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate_config(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """Raises ConfigError naming the first offending key. With devices, checks the mesh too."""
    _check_keys_and_types(config)
    try:
        parse_variant(config.model.variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(config.model.pool in ("cls", "patch_mean"), "model.pool", f"{config.model.pool!r} is not 'cls' or 'patch_mean'")
    _require(config.model.dtype in ("float32", "bfloat16"), "model.dtype", f"{config.model.dtype!r} is not float32 or bfloat16")
    _require(config.model.remat_policy in REMAT_POLICIES, "model.remat_policy", f"expected one of {list(REMAT_POLICIES)}")
    _require(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
    _require(config.crops.num_global >= 2, "crops.num_global", "MaSSL needs at least 2 global crops")
    _require(config.global_batch > 0, "global_batch", "must be positive")
    _require(config.epochs > 0 and config.steps_per_epoch > 0, "epochs", "epochs and steps_per_epoch must be positive")
    _require(config.optim.warmup_epochs <= config.epochs, "optim.warmup_epochs", "is longer than training")
    _require(config.loss.warmup_teacher_temp_epochs >= 0, "loss.warmup_teacher_temp_epochs", "must be >= 0")
    for key in ("loss.student_temp", "loss.teacher_temp", "loss.warmup_teacher_temp"):
        section, name = key.split(".")
        _require(config[section][name] > 0, key, "temperatures must be positive")
    for key in ("ema.momentum", "ema.momentum_end"):
        _require(0.0 <= config.ema[key.split(".")[1]] <= 1.0, key, "momentum must be in [0, 1]")
    _require(config.head.num_layers >= 1 and config.head.bottleneck_dim > 0, "head", "needs >= 1 layer and a bottleneck")
    try:
        check_memory_config(config.memory.size, config.memory.num_shards, config.memory.partition_size, config.global_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    _require(config.log_every_steps > 0, "log_every_steps", "must be positive")
    _require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
    _require(config.mesh.granule in sharding.GRANULES, "mesh.granule",
             f"{config.mesh.granule!r} is not one of {sharding.GRANULES}")
    if devices is not None:
        try:
            shape = tuple(sharding.mesh_from_config(config.mesh, devices).devices.shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        batch_ways = math.prod(shape[: len(sharding.BATCH_AXES)])
        _require(config.global_batch % batch_ways == 0, "global_batch",
                 f"{config.global_batch} does not divide over the {batch_ways} batch devices of mesh {shape}")
        _require(config.global_batch % (batch_ways * config.grad_accum_steps) == 0, "grad_accum_steps",
                 f"{config.grad_accum_steps} micro-batches do not divide the per-device batch of "
                 f"{config.global_batch // batch_ways}")
        _require(config.memory.num_shards % batch_ways == 0, "memory.num_shards",
                 f"{config.memory.num_shards} is not a multiple of the {batch_ways} batch devices of mesh {shape}")
