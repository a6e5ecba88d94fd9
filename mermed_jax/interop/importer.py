"""Any supported weight file -> our parameter trees, and into a TrainState's student and teacher.

`load_weights` reads our own msgpack exports and PyTorch files (timm, DINO, MerMED) into one
result type, so pretraining init, evaluation and `load_encoder` share a single code path.
`initialize_from_pretrained` is how pretraining starts from a checkpoint, as the official code
starts from ImageNet DINO: the same weights go into student and teacher, the optimiser state
is untouched (AdamW's moments do not depend on the parameter values at step 0).
"""

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mermed_jax.interop import files
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.pos_fit import fit_pos_embed
from mermed_jax.interop.pytorch_import import import_state_dict
from mermed_jax.interop.report import ImportedWeights, ImportReport
from mermed_jax.interop.trees import (
    Path, Tree, backbone_shapes, flatten, head_shapes, is_scanned, path_str, unflatten, unroll_blocks,
)
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.vit import ViTConfig
from mermed_jax.models.networks import backbone_config
from mermed_jax.training.train_state import TrainState

_POS_TOKENS = (("pos_embed",), ("cls_token",), ("reg_token",))


def _msgpack_parts(tree: Mapping[str, Any], source: str) -> tuple[Tree, Tree, Tree]:
    """(backbone, head params, head BatchNorm stats) from an export, a TrainState dict or a bare backbone;
    each checked to be a tree of numeric arrays (the rest of a TrainState, e.g. optimiser state, is not read)."""
    if "teacher_params" in tree:  # flax.serialization.to_state_dict(TrainState)
        files.check_param_tree(tree["teacher_params"], source, ("teacher_params",))
        files.check_param_tree(tree.get("teacher_batch_stats", {}), source, ("teacher_batch_stats",))
        params = tree["teacher_params"]
        return params.get("backbone", {}), params.get("head", {}), tree.get("teacher_batch_stats", {}).get("head", {})
    if "backbone" in tree:
        parts = tuple(tree.get(key, {}) for key in ("backbone", "head", "head_batch_stats"))
        for key, part in zip(("backbone", "head", "head_batch_stats"), parts):
            files.check_param_tree(part, source, (key,))
        return parts
    if "patch_embed" in tree or "blocks" in tree or "blocks_0" in tree:
        files.check_param_tree(tree, source, ())
        return dict(tree), {}, {}
    raise CheckpointError(f"{source}: no backbone found; top-level keys are {sorted(map(str, tree))}")


def _match_head(found: dict[Path, np.ndarray], expected: dict[Path, tuple], prefix: str, report: ImportReport) -> dict:
    out = {}
    for path, shape in expected.items():
        name = f"{prefix}/{path_str(path)}"
        if path not in found:
            report.missing.append(name)
        elif np.shape(found[path]) != shape:
            report.mismatched.append(f"{name}: {np.shape(found[path])} in the checkpoint, {shape} in the model")
        else:
            out[path] = np.asarray(found[path], np.float32)
            report.loaded.append(name)
    report.unexpected.extend(f"{prefix}/{path_str(p)}" for p in sorted(set(found) - set(expected)))
    return out


def import_msgpack_tree(
    tree: Mapping[str, Any], config: ViTConfig, head_config: HeadConfig | None, source: str
) -> ImportedWeights:
    report = ImportReport(source)
    backbone_tree, head_tree, stats_tree = _msgpack_parts(tree, source)
    try:
        found = flatten(unroll_blocks(backbone_tree))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    expected = backbone_shapes(config)
    pos = {p[0]: found[p] for p in _POS_TOKENS if p in found}
    fit_pos_embed(pos, expected[("pos_embed",)], config.num_registers, source, report.notes)
    found.update({(name,): value for name, value in pos.items()})
    backbone = {}
    for path, shape in expected.items():
        if path not in found:
            report.missing.append(path_str(path))
            continue
        if np.shape(found[path]) != shape:
            raise CheckpointError(
                f"{source}: {path_str(path)!r} has shape {np.shape(found[path])} in the checkpoint but the model "
                f"expects {shape}; check the model config"
            )
        backbone[path] = np.asarray(found[path], np.float32)
        report.loaded.append(path_str(path))
    report.unexpected.extend(path_str(p) for p in sorted(set(found) - set(expected)))
    if not backbone:
        raise CheckpointError(f"{source}: no ViT weights found; first names in the file: {sorted(map(path_str, found))[:8]}")
    head_params, head_stats = {}, {}
    if head_config is not None and head_tree:
        param_shapes, stat_shapes = head_shapes(head_config, config.width)
        head_params = _match_head(flatten(head_tree), param_shapes, "head", report)
        head_stats = _match_head(flatten(stats_tree), stat_shapes, "head_batch_stats", report)
    elif head_tree:
        report.unexpected.extend(f"head/{path_str(p)}" for p in sorted(flatten(head_tree)))
    return ImportedWeights(backbone, head_params, head_stats, report)


def load_weights(
    path: str | os.PathLike, config: ViTConfig, head_config: HeadConfig | None = None, *, strict: bool = False
) -> ImportedWeights:
    """Our arrays from a .msgpack export or a PyTorch .safetensors/.pth; `strict` refuses any mismatch."""
    path = pathlib.Path(path)
    if path.suffix == files.MSGPACK:
        weights = import_msgpack_tree(files.read_msgpack(path), config, head_config, str(path))
    else:
        weights = import_state_dict(files.read_state_dict(path), config, head_config, str(path))
    if strict and not weights.report.clean:
        raise CheckpointError(f"strict import failed:\n{weights.report.summary()}")
    return weights


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
