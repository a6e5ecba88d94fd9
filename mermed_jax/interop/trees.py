"""Our backbone and head parameter trees: their expected shapes, flat views and block layouts.

Files never depend on `ViTConfig.scan_layers`: everything here works on the unrolled layout
(`blocks_{i}`), and `scan_blocks` / `unroll_blocks` convert at the edges, so a checkpoint written
by a scanned model loads into an unrolled one and back.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mermed_jax.models.head import HeadConfig, ProjectionHead
from mermed_jax.models.vit import ViT, ViTConfig

Path = tuple[str, ...]
Shape = tuple[int, ...]
Tree = dict[str, Any]


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    return traverse_util.flatten_dict(dict(tree))


def unflatten(flat: Mapping[Path, Any]) -> Tree:
    return traverse_util.unflatten_dict(dict(flat))


def path_str(path: Path) -> str:
    return "/".join(path)


def backbone_shapes(config: ViTConfig) -> dict[Path, Shape]:
    """Shapes of an unrolled backbone's leaves, found by tracing init (nothing is allocated)."""
    unrolled = dataclasses.replace(config, scan_layers=False, precision="float32")
    images = jnp.zeros((1, config.patch_size, config.patch_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda: ViT(unrolled).init(jax.random.key(0), images, train=False))
    return {path: tuple(leaf.shape) for path, leaf in flatten(nn.unbox(variables["params"])).items()}


def head_shapes(config: HeadConfig, width: int) -> tuple[dict[Path, Shape], dict[Path, Shape]]:
    """Shapes of the projection head's params and BatchNorm statistics for inputs of `width`."""
    variables = jax.eval_shape(
        lambda: ProjectionHead(config).init(jax.random.key(0), jnp.zeros((2, width), jnp.float32))
    )
    shapes = {
        collection: {path: tuple(leaf.shape) for path, leaf in flatten(nn.unbox(variables.get(collection, {}))).items()}
        for collection in ("params", "batch_stats")
    }
    return shapes["params"], shapes["batch_stats"]


def is_scanned(backbone: Mapping[str, Any]) -> bool:
    return "blocks" in backbone


def unroll_blocks(backbone: Mapping[str, Any]) -> Tree:
    """`blocks/block/...` with a leading layer axis -> `blocks_{i}/...`; unrolled trees pass through."""
    if not is_scanned(backbone):
        return dict(backbone)
    out = {k: v for k, v in backbone.items() if k != "blocks"}
    stacked = backbone["blocks"].get("block", {}) if isinstance(backbone["blocks"], Mapping) else {}
    depths = {path_str(p): np.shape(x)[0] if np.ndim(x) else 0 for p, x in flatten(stacked).items()}
    if not depths or len(set(depths.values())) != 1:
        raise ValueError(f"scanned 'blocks/block' leaves must share one leading layer axis; found {depths}")
    depth = next(iter(depths.values()))
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return out


def scan_blocks(backbone: Mapping[str, Any], depth: int) -> Tree:
    """`blocks_{i}/...` -> `blocks/block/...` stacked on a leading layer axis (nn.scan's layout)."""
    out = {k: v for k, v in backbone.items() if not k.startswith("blocks_")}
    layers = [backbone[f"blocks_{i}"] for i in range(depth)]
    out["blocks"] = {"block": jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}
    return out


def to_numpy(tree: Any) -> Any:
    """Unboxes logical-partitioning metadata and fetches every leaf to host float32/int NumPy."""
    return jax.tree.map(np.asarray, nn.unbox(tree))
