"""Our leaves <-> timm ViT / DINO-head state_dict names and tensor layouts.

One table drives both directions, so export and import cannot drift apart: each leaf of an
unrolled backbone has one timm name and one `Layout` saying how the array becomes the torch
tensor (Flax keeps kernels as [in, out] and convolutions as HWIO; torch as [out, in] and OIHW;
our attention kernels keep heads as separate axes where timm fuses them).

The head follows DINO's `DINOHead.mlp`, an nn.Sequential of Linear, BatchNorm1d and GELU layers:
with BatchNorm the Linears sit at indices 0, 3, 6 and the BatchNorms at 1, 4; without, the
Linears sit at 0, 2, 4. Those indices are read off a checkpoint rather than assumed.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

from mermed_jax.interop.trees import Path, Shape

# DINO's weight-normalised prototype layer; MaSSL compares with a memory instead, so we have none.
DINO_LAST_LAYER_PREFIX = "head.last_layer."
HEAD_PREFIX = "head.mlp."
# BatchNorm bookkeeping that carries no weights; written on export so torch loads strictly.
BN_COUNTER = "num_batches_tracked"

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma",
               "mean": "running_mean", "var": "running_var"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """torch = transpose(reshape(ours, flat), perm). Both steps are exact, and so is the inverse."""

    ours: Shape
    flat: Shape
    perm: tuple[int, ...]

    @property
    def torch_shape(self) -> Shape:
        return tuple(self.flat[i] for i in self.perm)

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(np.asarray(x).reshape(self.flat), self.perm))

    def from_torch(self, t: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(np.asarray(t), np.argsort(self.perm)).reshape(self.ours))


def _identity(shape: Shape) -> Layout:
    return Layout(shape, shape, tuple(range(len(shape))))


def _backbone_layout(path: Path, shape: Shape) -> Layout:
    module, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if module == "patch_embed" and leaf == "kernel":  # [p, p, C, D] -> [D, C, p, p]
        return Layout(shape, shape, (3, 2, 0, 1))
    if module == "qkv":  # [D, 3, H, Dh] -> [3*H*Dh, D]; bias [3, H, Dh] -> [3*H*Dh]
        if leaf == "kernel":
            return Layout(shape, (shape[0], int(np.prod(shape[1:]))), (1, 0))
        return Layout(shape, (int(np.prod(shape)),), (0,))
    if module == "proj" and leaf == "kernel":  # [H, Dh, D] -> [D, H*Dh]
        return Layout(shape, (shape[0] * shape[1], shape[2]), (1, 0))
    if leaf == "kernel":
        return Layout(shape, shape, (1, 0))
    return _identity(shape)


def _backbone_name(path: Path) -> str:
    *modules, leaf = path
    parts = []
    for module in modules:
        block = re.fullmatch(r"blocks_(\d+)", module)
        parts.append(f"blocks.{block.group(1)}" if block else "patch_embed.proj" if module == "patch_embed" else module)
    return ".".join(parts + [_LEAF_NAMES[leaf] if modules else leaf])


def backbone_table(shapes: Mapping[Path, Shape]) -> dict[str, tuple[Path, Layout]]:
    """timm name -> (our unrolled path, layout) for every leaf of an unrolled backbone."""
    return {_backbone_name(path): (path, _backbone_layout(path, shape)) for path, shape in shapes.items()}


def dino_head_indices(num_layers: int, use_bn: bool) -> dict[str, int]:
    """Our head module name -> its index in DINOHead.mlp, as DINO builds it."""
    step = 3 if use_bn else 2
    indices = {f"mlp_{i}": step * i for i in range(num_layers)}
    if use_bn:
        indices.update({f"bn_{i}": 3 * i + 1 for i in range(num_layers - 1)})
    return indices


def detect_dino_head_indices(names: Iterable[str]) -> dict[str, int]:
    """Our head module name -> Sequential index, read off a checkpoint's `head.mlp.*` names.

    A module with running statistics is a BatchNorm, any other a Linear; the k-th of each kind
    maps to our `bn_k` / `mlp_k`, whatever the checkpoint's hidden sizes or depth.
    """
    modules: dict[int, set[str]] = {}
    for name in names:
        match = re.fullmatch(re.escape(HEAD_PREFIX) + r"(\d+)\.(\w+)", name)
        if match:
            modules.setdefault(int(match.group(1)), set()).add(match.group(2))
    indices: dict[str, int] = {}
    n_linear = n_bn = 0
    for index in sorted(modules):
        if "running_mean" in modules[index]:
            indices[f"bn_{n_bn}"], n_bn = index, n_bn + 1
        else:
            indices[f"mlp_{n_linear}"], n_linear = index, n_linear + 1
    return indices


def head_table(
    param_shapes: Mapping[Path, Shape], stat_shapes: Mapping[Path, Shape], indices: Mapping[str, int]
) -> dict[str, tuple[Path, Layout]]:
    """DINO name -> (('params' | 'batch_stats', module, leaf), layout), for modules in `indices`."""
    table = {}
    for collection, shapes in (("params", param_shapes), ("batch_stats", stat_shapes)):
        for (module, leaf), shape in shapes.items():
            if module in indices:
                name = f"{HEAD_PREFIX}{indices[module]}.{_LEAF_NAMES[leaf]}"
                table[name] = ((collection, module, leaf), Layout(shape, shape, (1, 0)) if leaf == "kernel" else _identity(shape))
    return table
