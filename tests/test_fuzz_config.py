"""The config validator, fuzzed: random edits of a working config either build or fail first thing.

An edit replaces 1-3 values (by any type, in or out of range) or adds an unknown key. Each edited
config must either pass `validate_config` and then build its train state's shapes and schedules
(tracing only), or raise ConfigError whose message starts with a config key and names an edited
one; and `pretrain.train` must refuse it before writing or compiling anything. Any other exception
is a validator gap: a job that would die after compilation, minutes into a pod reservation.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import pytest
from fuzzing import budget
from hypothesis import event, given
from hypothesis import strategies as st
from repo import tiny_config_dict

from mermed_jax import pretrain
from mermed_jax.recipe.validation import ConfigError, validate_config
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import train_state

pytestmark = pytest.mark.fuzz

BASE = tiny_config_dict().to_dict()


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "mixture":
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


LEAVES = _leaves(BASE)
_ANY = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.lists(st.integers(-2, 8), max_size=3),
                 st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True))


def _values_like(original: object) -> st.SearchStrategy:
    """Plausible edits of a value of the original's type, and anything at all."""
    if isinstance(original, bool):
        like = st.booleans()
    elif isinstance(original, int):
        like = st.one_of(st.integers(-3, 3), st.integers(0, 4 * original + 8))
    elif isinstance(original, float):
        like = st.one_of(st.floats(-1.0, 2.0), st.sampled_from([0.0, -0.0, math.nan, math.inf, 1e9]))
    elif isinstance(original, str):
        like = st.sampled_from(["", "bogus", "S/16", "Ti/4", "cls", "patch_mean", "float32", "bfloat16", "max", "none"])
    elif isinstance(original, (tuple, list)):
        like = st.lists(st.integers(-2, 9), max_size=4).map(tuple)
    else:
        like = _ANY
    return st.one_of(like, like, _ANY)


def _set(tree: dict, key: str, value: object) -> None:
    *parents, leaf = key.split(".")
    for name in parents:
        tree = tree[name]
    tree[leaf] = value


@st.composite
def edited_configs(draw: st.DrawFn) -> tuple[ml_collections.ConfigDict, list[str]]:
    tree = tiny_config_dict().to_dict()
    keys = draw(st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=3, unique=True))
    for key in keys:
        _set(tree, key, draw(_values_like(LEAVES[key])))
    if draw(st.integers(0, 9)) == 0:
        section = draw(st.sampled_from(["model", "optim", "memory", "data"]))
        tree[section]["unknwn"] = 1
        keys.append(f"{section}.unknwn")
    return ml_collections.ConfigDict(tree), keys


def _names_an_edited_key(message: str, keys: list[str]) -> bool:
    return any(key in message or key.rsplit(".", 1)[-1] in message for key in keys)


@budget(150)
@given(edited=edited_configs())
def test_edited_configs_build_or_fail_first_naming_the_key(tmp_path_factory, edited):
    config, keys = edited
    try:
        validate_config(config, devices=jax.devices())
    except ConfigError as e:
        event("refused")
        message = str(e)
        assert message.split(":", 1)[0].split("=", 1)[0].split(" ", 1)[0] in LEAVES or "unknwn" in message, message
        assert _names_an_edited_key(message, keys), (keys, message)
        workdir = tmp_path_factory.mktemp("job") / "w"
        with pytest.raises(ConfigError):
            pretrain.train(config, workdir)
        assert not workdir.exists()  # refused before the workdir, the data or any compilation
        return
    event("valid")
    jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0)))
    build_schedules(config)
