"""Resizing learned position embeddings the way PyTorch DINO does.

Checkpoints trained in PyTorch (DINO, timm, the MerMED release) resize their 14x14 position grid
for 96 px local crops with `F.interpolate(mode='bicubic', scale_factor=(out + 0.1) / in)`. That is
torch's cubic convolution (A = -0.75, half-pixel centres, border taps clamped, no antialiasing)
with the source coordinate computed from the *given* scale factor, not from out/in. Matching it
exactly is what lets imported weights give the same outputs, so we build the interpolation as two
small dense matrices (rows x cols of the grid) in NumPy at trace time and apply them with einsum.
`jax.image.resize` differs: it antialiases when downsampling and uses Keys' A = -0.5.
"""

import functools

import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75
DINO_SCALE_OFFSET = 0.1


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Torch's four cubic-convolution tap weights for fractional offsets t in [0, 1)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int, scale_offset: float) -> np.ndarray:
    """[out_size, in_size] matrix M with `M @ x` equal to torch's 1-D bicubic resize of x.

    `scale_offset` is DINO's +0.1: torch is called with scale_factor (out + offset) / in and maps
    output pixel i to source coordinate (i + 0.5) * in / (out + offset) - 0.5.
    """
    scale_factor = (out_size + scale_offset) / in_size
    ratio = np.float32(1.0 / scale_factor)
    src = ratio * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    floor = np.floor(src)
    weights = _cubic_weights((src - floor).astype(np.float64))
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        index = np.clip(floor.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
    return matrix.astype(np.float32)


def resize_pos_embed_grid(
    grid: jnp.ndarray, out_hw: tuple[int, int], scale_offset: float = DINO_SCALE_OFFSET
) -> jnp.ndarray:
    """Resize a [H, W, D] grid of position embeddings to [out_h, out_w, D] (torch bicubic)."""
    in_h, in_w, _ = grid.shape
    if (in_h, in_w) == tuple(out_hw):
        return grid
    rows = jnp.asarray(torch_bicubic_matrix(in_h, out_hw[0], scale_offset))
    cols = jnp.asarray(torch_bicubic_matrix(in_w, out_hw[1], scale_offset))
    grid32 = grid.astype(jnp.float32)
    resized = jnp.einsum("oh,hwd,pw->opd", rows, grid32, cols, precision="highest")
    return resized.astype(grid.dtype)
