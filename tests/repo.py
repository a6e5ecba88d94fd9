"""Shared test helpers: the repository's root, its tiny demo config and pixel statistics for it.

Imported as `repo` by the tests (pytest puts tests/ on sys.path) and by tests/_checkpoint_job.py;
tests/_fed_steps.py, run as `python -m tests._fed_steps`, imports it as `tests.repo`.
"""

import pathlib

import ml_collections
import numpy as np

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax.recipe.arguments import load_config_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo_cpu.py"


def tiny_config_dict(arg: str | None = None) -> ml_collections.ConfigDict:
    """A fresh ConfigDict of configs/demo_cpu.py in float32 (the tests' equivalences and
    tolerances are fp32 arithmetic's; the demo itself runs `mixed`), with `arg` applied.

    arg: "key=value,key=value" as get_config takes it (dotted keys such as model.depth, the
    aliases of mermed_jax.recipe.arguments such as batch; values parsed as Python literals).
    Tests that need the config in a test or fixture use conftest's `tiny_config` fixture, which
    is this function; this is for module level (hypothesis strategies) and the helper scripts.
    """
    return load_config_file(DEMO_CONFIG, "precision=float32" + (f",{arg}" if arg else ""))


def pixel_stats(mean: float = 0.5, std: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Per-modality pixel mean and std, each float32 [NUM_MODALITIES, 3] filled with one value."""
    return (np.full((NUM_MODALITIES, 3), mean, np.float32), np.full((NUM_MODALITIES, 3), std, np.float32))
