"""Evaluation protocols, registered by name (big_vision's registry pattern).

A protocol is one module in this package whose scoring function carries `@register("name", ...)`;
a config runs it by listing the name in `protocols`. Nothing else spells a protocol's name: the sweep
plans rows, loads inputs and scores through `Protocol`, and the eval config takes the allowed names
from `names()`. Every module of this package is imported on the first lookup (pkgutil), so a new
protocol needs no import line anywhere either.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from mermed_jax.eval.encoders import Encoder
from mermed_jax.eval.features import FeatureSet
from mermed_jax.eval.inputs import Dataset, SplitLoader


@dataclasses.dataclass(frozen=True)
class Row:
    """What a protocol scores one results.csv row from."""
    key: dict  # encoder, dataset, protocol, feature, label_fraction, seed
    dataset: Dataset
    train: FeatureSet  # already cut to the row's label fraction
    val: FeatureSet
    test: FeatureSet
    encoder: Encoder
    mesh: jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class Scores:
    test: np.ndarray  # [N_test, C] probabilities, in the shape metrics.compute_metrics takes
    chosen_c: float | None = None  # a regularisation chosen on val, reported in results.csv


ScoreFn = Callable[[ml_collections.ConfigDict, Row], Scores]
FeatureNames = Callable[[ml_collections.ConfigDict, Encoder], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    inputs: SplitLoader  # which splits its rows run on (protocols with the same loader share one load)
    # The key's `feature` of each row for an encoder; () plans no rows (raw pixels cannot be fine-tuned).
    features: FeatureNames
    # Rows on all labels cannot depend on the seed (lbfgs, kNN): they run once, under the first seed,
    # instead of repeating identical numbers that would fake a confidence interval.
    deterministic: bool
    scores: ScoreFn


_REGISTRY: dict[str, Protocol] = {}


def register(name: str, *, inputs: SplitLoader, features: FeatureNames,
             deterministic: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Decorates a protocol's scoring function, registering the protocol under `name`."""
    def decorate(scores: ScoreFn) -> ScoreFn:
        if name in _REGISTRY:
            raise ValueError(f"protocol {name!r} is registered twice "
                             f"({_REGISTRY[name].scores.__module__} and {scores.__module__})")
        _REGISTRY[name] = Protocol(name, inputs, features, deterministic, scores)
        return scores
    return decorate


@functools.cache
def _discover() -> None:
    """Imports every module of this package once: importing one registers its protocol."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def names() -> tuple[str, ...]:
    _discover()
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Protocol:
    """The protocol registered as `name`; an unknown name is a config error listing the known ones."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"protocols: {name!r} is not one of {names()}")
    return _REGISTRY[name]
