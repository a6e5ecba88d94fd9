"""Fitting a checkpoint's position embedding to our model's grid and token layout.

Ours is [1, 1 + g*g, D]: the CLS position, then the patch grid; registers have no position.
timm writes two other layouts, both folded in exactly: `no_embed_class=True` ([1, n*n, D], the
CLS token has no position, so ours gets a zero row) and registers with positions
([1, 1 + R + n*n, D], each register's row is added into its token). A different grid is resized
as `F.interpolate(size=(g, g), mode='bicubic')` does (pos_embed.py's torch-exact matrices,
without DINO's +0.1 offset, which only applies to on-the-fly resizing in the forward pass).
"""

import math
import warnings

import numpy as np

from mermed_jax.interop.files import CheckpointError
from mermed_jax.models.pos_embed import torch_bicubic_matrix


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if n > 0 and side * side == n else None


def _token_layout(length: int, num_registers: int, target_side: int) -> str | None:
    """Which of timm's layouts a pos_embed of `length` rows is; one that fits our grid wins."""
    options = {"cls": length - 1, "cls+registers": length - 1 - num_registers, "patches": length}
    if not num_registers:
        del options["cls+registers"]
    sides = {name: _square_side(n) for name, n in options.items()}
    fitting = [name for name, side in sides.items() if side == target_side]
    valid = [name for name, side in sides.items() if side is not None]
    return (fitting or valid or [None])[0]


def fit_pos_embed(
    tensors: dict[str, np.ndarray], target_shape: tuple[int, ...], num_registers: int, source: str, notes: list[str]
) -> None:
    """Rewrites tensors['pos_embed'] (and folds into 'reg_token') in place to fit `target_shape`."""
    if "pos_embed" not in tensors:
        return
    original_shape = tuple(np.shape(tensors["pos_embed"]))
    pos = np.asarray(tensors["pos_embed"], np.float32)
    _, target_len, width = target_shape
    side = _square_side(target_len - 1)
    layout = _token_layout(pos.shape[1], num_registers, side) if pos.ndim == 3 else None
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width or layout is None:
        raise CheckpointError(
            f"{source}: 'pos_embed' has shape {original_shape} in the checkpoint but the model expects {tuple(target_shape)}"
        )
    if layout == "cls+registers":
        if "reg_token" not in tensors:
            raise CheckpointError(f"{source}: 'pos_embed' has register positions but the checkpoint has no 'reg_token'")
        tensors["reg_token"] = tensors["reg_token"] + pos[:, 1:1 + num_registers]
        pos = np.concatenate([pos[:, :1], pos[:, 1 + num_registers:]], axis=1)
        notes.append(f"pos_embed: folded the {num_registers} register positions into reg_token")
    elif layout == "patches":
        pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
        notes.append("pos_embed: the checkpoint has no CLS position (timm no_embed_class); using zero")
    in_side = _square_side(pos.shape[1] - 1)
    if in_side != side:
        rows = torch_bicubic_matrix(in_side, side, 0.0).astype(np.float64)
        grid = pos[0, 1:].reshape(in_side, in_side, width).astype(np.float64)
        resized = np.einsum("oh,hwd,pw->opd", rows, grid, rows).reshape(1, side * side, width)
        pos = np.concatenate([pos[:, :1], resized.astype(np.float32)], axis=1)
        message = f"{source}: resized pos_embed from a {in_side}x{in_side} to a {side}x{side} grid (torch bicubic)"
        warnings.warn(message, stacklevel=3)
        notes.append(message)
    tensors["pos_embed"] = pos
