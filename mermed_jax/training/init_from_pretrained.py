"""Starting pretraining from a weight file: the imported arrays into a TrainState's student and teacher.

This is how pretraining starts from a checkpoint, as the official code starts from ImageNet DINO:
the same weights go into student and teacher, and the optimiser state is untouched (AdamW's
moments do not depend on the parameter values at step 0). Reading and matching the file is the
interop package's job (`load_weights`); this module only places its result into live parameters,
which are boxed with logical axes, sharded, and perhaps scanned over layers.
"""

import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mermed_jax.interop.import_report import ImportedWeights, ImportReport
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import Path, Tree, flatten, is_scanned, unflatten
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.networks import backbone_config
from mermed_jax.training.train_state import TrainState


def _with_value(old: Any, value: np.ndarray) -> Any:
    """`value` in place of a leaf: same dtype, same sharding, same logical-axis box."""
    current = old.unbox() if isinstance(old, nn.meta.AxisMetadata) else old
    new = jnp.asarray(value, dtype=current.dtype)
    if isinstance(current, jax.Array):
        new = jax.device_put(new, current.sharding)
    return old.replace_boxed(new) if isinstance(old, nn.meta.AxisMetadata) else new


def merge_into(tree: Any, updates: Mapping[Path, np.ndarray]) -> Any:
    """A copy of `tree` (boxed or not, unrolled or scanned) with the unrolled-path `updates` set."""
    if not updates:
        return tree
    flat = flatten(tree)
    scanned = is_scanned(tree)
    per_leaf: dict[Path, list[tuple[int | None, np.ndarray]]] = {}
    for path, value in updates.items():
        if scanned and path[0].startswith("blocks_"):
            per_leaf.setdefault(("blocks", "block", *path[1:]), []).append((int(path[0].split("_")[1]), value))
        else:
            per_leaf.setdefault(path, []).append((None, value))
    for path, values in per_leaf.items():
        old = flat[path]
        current = np.array(old.unbox() if isinstance(old, nn.meta.AxisMetadata) else old)
        for layer, value in values:
            if layer is None:
                current = value
            else:
                current[layer] = value
        flat[path] = _with_value(old, current)
    return unflatten(flat)


def apply_to_train_state(state: TrainState, weights: ImportedWeights) -> TrainState:
    """The imported backbone and head in both student and teacher (params and BatchNorm stats)."""

    def params(tree: Tree) -> Tree:
        return {**tree, "backbone": merge_into(tree["backbone"], weights.backbone),
                "head": merge_into(tree["head"], weights.head_params)}

    def stats(tree: Tree) -> Tree:
        return {**tree, "head": merge_into(tree["head"], weights.head_stats)} if weights.head_stats else tree

    return state.replace(
        params=params(state.params), teacher_params=params(state.teacher_params),
        batch_stats=stats(state.batch_stats), teacher_batch_stats=stats(state.teacher_batch_stats),
    )


def initialize_from_pretrained(
    state: TrainState, config: ml_collections.ConfigDict, path: str | os.PathLike | None = None, *, strict: bool = False
) -> tuple[TrainState, ImportReport]:
    """Loads `path` (default: config.init_checkpoint) into student and teacher and logs the report."""
    path = path if path is not None else config.init_checkpoint
    head_config = HeadConfig(**config.head.to_dict())
    weights = load_weights(path, backbone_config(config, teacher=True), head_config, strict=strict)
    logging.info("initialised from pretrained weights\n%s", weights.report.summary())
    return apply_to_train_state(state, weights), weights.report
