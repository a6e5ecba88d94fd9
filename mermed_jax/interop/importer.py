"""Any supported weight file -> our parameter trees, as one result type with a report.

`load_weights` reads our own msgpack exports and PyTorch files (timm, DINO, MerMED) into
`ImportedWeights`, so pretraining init (mermed_jax.training.init_from_pretrained), evaluation,
the export CLI and `load_encoder` share a single code path. Placing the arrays into a live
TrainState is training's business and lives there, not here.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mermed_jax.interop import files
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.import_report import ImportedWeights, ImportReport
from mermed_jax.interop.pos_fit import fit_pos_embed
from mermed_jax.interop.pytorch_import import import_state_dict
from mermed_jax.interop.trees import (
    Path,
    Tree,
    backbone_shapes,
    flatten,
    head_shapes,
    path_str,
    unroll_blocks,
)
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.vit import ViTConfig

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
    source = os.fspath(path)  # a local path or a bucket URL (files reads both)
    if source.endswith(files.MSGPACK):
        weights = import_msgpack_tree(files.read_msgpack(source), config, head_config, source)
    else:
        weights = import_state_dict(files.read_state_dict(source), config, head_config, source)
    if strict and not weights.report.clean:
        raise CheckpointError(f"strict import failed:\n{weights.report.summary()}")
    return weights
