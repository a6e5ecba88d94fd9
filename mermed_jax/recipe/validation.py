"""Checks a config before anything is compiled, with errors that name the key.

A pod job that dies in minute ten on a typo wastes a reservation: everything that can be known
from the config and the device count is checked here, first thing. Per-key rules (type, finite,
bounds, choices) come from the schema (`schema.py`); this module adds only the rules that relate
several keys or the devices.
"""

import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from mermed_jax import sharding
from mermed_jax.recipe import schema
from mermed_jax.ssl.memory import check_memory_config


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the key."""


def _takes_mapping(annotation: Any) -> bool:
    """Whether a key's annotation admits a mapping (its value is then the user's, not a section)."""
    return any(typing.get_origin(a) in (Mapping, dict) or a in (Mapping, dict)
               for a in (typing.get_args(annotation) or (annotation,)))


def _given_leaves(tree: Mapping, mapping_keys: set[str], prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping) and path not in mapping_keys:
            out.update(_given_leaves(value, mapping_keys, path + "."))
        else:
            out[path] = value
    return out


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_args(annotation):  # Mapping[str, float], tuple[int, int, int]
        return str(annotation).replace("typing.", "").replace("collections.abc.", "")
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _is_type(value: Any, annotation: Any) -> bool:
    """isinstance against an annotation; a bool is no number and an int is a float (not the reverse)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_type(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if isinstance(value, bool):
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_type(v, a) for v, a in zip(value, args))
    if origin in (Mapping, dict) or annotation in (Mapping, dict):
        return isinstance(value, Mapping)
    return isinstance(value, annotation)


def _numbers(value: Any) -> list:
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _check_leaf(leaf: schema.Leaf, value: Any) -> None:
    """Type, finiteness and bounds of one key. An int is a count or a size (> 0) unless the
    schema bounds it otherwise (ge/gt) or allows any integer (any_int)."""
    if value is None:
        if leaf.default is None:
            return
        raise ConfigError(f"{leaf.path}: must be set (got None; the recipe's value is {leaf.default!r})")
    if not _is_type(value, leaf.annotation):
        raise ConfigError(f"{leaf.path}: expected {_type_name(leaf.annotation)}, got {type(value).__name__} {value!r}")
    b = leaf.bounds
    if "check" in b:
        try:
            b["check"](value)
        except ValueError as e:
            raise ConfigError(str(e) if leaf.path in str(e) else f"{leaf.path}: {e}") from None
    if "choices" in b and value not in b["choices"]:
        raise ConfigError(f"{leaf.path}: {value!r} is not one of {tuple(b['choices'])}")
    why = f" ({b['why']})" if "why" in b else ""
    for x in _numbers(value):
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{leaf.path}: must be finite, got {value!r}")
        if isinstance(x, int) and not b.get("any_int") and "ge" not in b and "gt" not in b:
            _require(x > 0, leaf.path, f"must be positive, got {value!r}")
        for name, ok, text in (("gt", lambda lim: x > lim, ">"), ("ge", lambda lim: x >= lim, ">="),
                               ("lt", lambda lim: x < lim, "<"), ("le", lambda lim: x <= lim, "<=")):
            if name in b:
                _require(ok(b[name]), leaf.path, f"must be {text} {b[name]}{why}, got {value!r}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_keys_and_values(config: ml_collections.ConfigDict) -> None:
    """Every key known and every value of its key's type, finite and within the schema's bounds.

    Anything that passes here can be compared and divided by the checks that follow: a None, a
    bool for a width or a NaN rate used to surface as a TypeError or ZeroDivisionError while
    building the model, after the job had started.
    """
    known = schema.leaves()
    given = _given_leaves(config.to_dict(), {path for path, leaf in known.items() if _takes_mapping(leaf.annotation)})
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown config key (unknown keys: {', '.join(unknown)})")
    for path, value in given.items():
        _check_leaf(known[path], value)


def validate_config(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> None:
    """Raises ConfigError naming the first offending key. With devices, checks the mesh too."""
    check_keys_and_values(config)
    _require(config.optim.warmup_epochs <= config.epochs, "optim.warmup_epochs", "is longer than training")
    try:
        check_memory_config(config.memory.size, config.memory.num_shards, config.memory.partition_size, config.global_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
