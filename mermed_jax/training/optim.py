"""AdamW as the official PyTorch recipe runs it: per-tensor clipping, layer-wise LR decay, and a
decoupled weight decay whose value changes every step.

PyTorch applies layer decay through param groups whose learning rate is `lr * scale`; AdamW's
decoupled decay is multiplied by that same group LR. The update is therefore
`-lr * scale * (adam_direction + wd * p)`, with wd = 0 for biases, norms, the position embedding
and the CLS/register tokens. Gradients are clipped per tensor (DINO's clip_gradients), not by the
global norm. The per-step LR and WD come in as extra arguments (see ssl/schedules.py).
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

_STEM_PARAMS = ("patch_embed", "pos_embed", "cls_token", "reg_token")
_NO_DECAY_LEAVES = ("bias", "scale", "gamma", "pos_embed", "cls_token", "reg_token")


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _is_scanned(names: tuple[str, ...]) -> bool:
    """Leaves under a scanned `blocks` module carry a leading layer axis."""
    return len(names) > 1 and names[0] == "backbone" and names[1] == "blocks"


def layer_id(names: tuple[str, ...], depth: int) -> int | np.ndarray:
    """0 for the stem, k+1 for block k, depth+1 for the final norm, depth+2 for the head."""
    if names[0] == "head":
        return depth + 2
    if names[0] != "backbone":
        raise ValueError(f"parameter {'/'.join(names)} is neither under 'backbone' nor 'head'")
    part = names[1]
    if part in _STEM_PARAMS:
        return 0
    if part == "norm":
        return depth + 1
    if part == "blocks":
        return np.arange(depth) + 1
    if part.startswith("blocks_"):
        return int(part.split("_")[1]) + 1
    raise ValueError(f"parameter {'/'.join(names)} has no layer-decay rule")


def layer_decay_multipliers(params: PyTree, depth: int, decay: float) -> PyTree:
    """decay ** (depth + 2 - layer_id) per leaf; scanned leaves get one value per layer."""

    def multiplier(path, leaf):
        scale = np.asarray(decay, np.float64) ** (depth + 2 - np.asarray(layer_id(_path_names(path), depth)))
        if scale.ndim:  # [depth] -> broadcast over the stacked leaf
            scale = scale.reshape((-1,) + (1,) * (np.ndim(leaf) - 1))
        return scale.astype(np.float32)

    return jax.tree_util.tree_map_with_path(multiplier, params)


def weight_decay_mask(params: PyTree) -> PyTree:
    """1.0 where AdamW's decay applies (matrices), 0.0 for biases, norms, pos embedding, tokens."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: np.float32(_path_names(path)[-1] not in _NO_DECAY_LEAVES), params
    )


def clip_per_tensor(max_norm: float, params: PyTree) -> optax.GradientTransformation:
    """Scales each gradient tensor to norm <= max_norm on its own (scanned leaves: per layer)."""
    scanned = jax.tree_util.tree_map_with_path(lambda path, _: _is_scanned(_path_names(path)), params)

    def clip(g, is_scanned):
        axes = tuple(range(1, g.ndim)) if is_scanned else None
        norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=is_scanned))
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        return (g * coef).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(clip, updates, scanned), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def scale_by_layerwise_lr_and_decoupled_wd(multipliers: PyTree, wd_mask: PyTree) -> optax.GradientTransformationExtraArgs:
    def update_fn(updates, state, params, *, learning_rate, weight_decay, **unused):
        del unused
        new = jax.tree.map(
            lambda u, p, m, d: -learning_rate * m * (u + weight_decay * d * p),
            updates, params, multipliers, wd_mask,
        )
        return new, state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(optim_config: Mapping, params: PyTree, depth: int) -> optax.GradientTransformationExtraArgs:
    """The student's optimiser (clip_grad <= 0 disables clipping, as in DINO); call `update(grads, state, params, learning_rate=, weight_decay=)`."""
    clip = optim_config["clip_grad"]
    return optax.chain(
        clip_per_tensor(clip, params) if clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=optim_config["b1"], b2=optim_config["b2"], eps=optim_config["eps"]),
        scale_by_layerwise_lr_and_decoupled_wd(
            layer_decay_multipliers(params, depth, optim_config["layer_decay"]), weight_decay_mask(params)
        ),
    )
