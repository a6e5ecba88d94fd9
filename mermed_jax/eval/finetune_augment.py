"""Fine-tuning augmentation on the device, per image under vmap: random resized crop, horizontal
flip, a RandAugment-like policy and random erasing.

The official recipe uses timm's rand-m9-mstd0.5-inc1. This policy keeps its shape (2 operations per
image, magnitude drawn from N(9, 0.5) clipped to [0, 10], "increasing" variants whose strength grows
with the magnitude) over the 15 operations of timm's increasing set: AutoContrast,
Invert, Brightness, Contrast, Color, Solarize, Posterize, and timm's Equalize, Sharpness, SolarizeAdd,
Rotate (30 degrees), ShearX/Y (0.3) and TranslateX/YRel (0.45 of the side), the geometric ones sampled
bilinearly with timm's grey fill (128). Random erasing follows
timm's (probability, area 2-33%, aspect 0.3-3.3, per-pixel normal noise, one box).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.ndimage

MAGNITUDE_STD, MAX_MAGNITUDE = 0.5, 10.0


def random_resized_crop(key: jax.Array, image: jnp.ndarray, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jnp.ndarray:
    """One [H, W, 3] float image -> [size, size, 3]: a box of random area and aspect, resampled bilinearly."""
    height, width = image.shape[:2]
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * height * width
    log_ratio = jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    top = jax.random.uniform(k_y, ()) * (height - box_h)
    left = jax.random.uniform(k_x, ()) * (width - box_w)
    # Bilinear sampling at the centres of the output pixels (no antialiasing: crops rarely shrink much).
    centres = (jnp.arange(size) + 0.5) / size
    rows = top + centres * box_h - 0.5
    cols = left + centres * box_w - 0.5
    grid = jnp.meshgrid(rows, cols, indexing="ij")
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], grid, order=1, mode="nearest")
                      for c in range(image.shape[-1])], axis=-1)


def _grey(image: jnp.ndarray) -> jnp.ndarray:
    return (image @ jnp.array([0.299, 0.587, 0.114]))[..., None]


def _blend(a: jnp.ndarray, b: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
    return jnp.clip(b + factor * (a - b), 0.0, 1.0)


FILL = 128.0 / 255.0


def _affine(image: jnp.ndarray, matrix: jnp.ndarray, offset: jnp.ndarray) -> jnp.ndarray:
    """PIL's Image.transform(AFFINE): output pixel centre (x, y) samples input at matrix @ (x, y) + offset."""
    height, width = image.shape[:2]
    ys, xs = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
    src_x = matrix[0, 0] * xs + matrix[0, 1] * ys + offset[0] - 0.5
    src_y = matrix[1, 0] * xs + matrix[1, 1] * ys + offset[1] - 0.5
    return jnp.stack([jax.scipy.ndimage.map_coordinates(image[..., c], [src_y, src_x], order=1, mode="constant",
                                                        cval=FILL) for c in range(image.shape[-1])], axis=-1)


def rotate(image: jnp.ndarray, degrees: jnp.ndarray) -> jnp.ndarray:
    """Counter-clockwise about the centre, as PIL's Image.rotate."""
    t = -jnp.deg2rad(degrees)
    matrix = jnp.array([[jnp.cos(t), jnp.sin(t)], [-jnp.sin(t), jnp.cos(t)]])
    centre = jnp.array([image.shape[1], image.shape[0]]) / 2.0
    return _affine(image, matrix, centre - matrix @ centre)


def equalize(image: jnp.ndarray) -> jnp.ndarray:
    """PIL's ImageOps.equalize per channel on the image quantised to 8 bits."""
    values = jnp.round(image * 255.0).astype(jnp.int32)

    def channel(v):
        hist = jnp.bincount(v.ravel(), length=256)
        last = hist[v.max()]
        step = (v.size - last) // 255
        lut = jnp.minimum((jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1), 255)
        return jnp.where(step > 0, lut[v], v)

    return jnp.stack([channel(values[..., c]) for c in range(image.shape[-1])], -1).astype(image.dtype) / 255.0


def sharpness(image: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH filter (centre 5, ring 1, /13), borders kept."""
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    height, width = image.shape[:2]
    ring = sum(padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3))
    smooth = (ring + 4.0 * image) / 13.0
    interior = jnp.zeros((height, width, 1), bool).at[1:-1, 1:-1].set(True)
    return _blend(image, jnp.where(interior, smooth, image), factor)


def _apply_op(index: jnp.ndarray, image: jnp.ndarray, level: jnp.ndarray, sign: jnp.ndarray) -> jnp.ndarray:
    """Operation `index` at level in [0, 1] on an image in [0, 1]."""
    enhance = 1.0 + sign * 0.9 * level  # timm's enhance range [0.1, 1.9]

    def autocontrast(x):
        low, high = x.min((0, 1)), x.max((0, 1))
        return jnp.where(high > low, (x - low) / jnp.maximum(high - low, 1e-6), x)

    shear = 0.3 * level * sign
    shift = 0.45 * level * sign
    identity, zero = jnp.eye(2), jnp.zeros(2)
    dropped = 2.0 ** (4 + jnp.floor(4 * level))
    ops = [
        autocontrast,
        equalize,
        lambda x: 1.0 - x,
        lambda x: _blend(x, jnp.zeros_like(x), enhance),  # brightness
        lambda x: _blend(x, jnp.full_like(x, _grey(x).mean()), enhance),  # contrast
        lambda x: _blend(x, jnp.broadcast_to(_grey(x), x.shape), enhance),  # color
        lambda x: jnp.where(x >= 1.0 - level, 1.0 - x, x),  # solarize (increasing: lower threshold)
        lambda x: jnp.floor(x * 255.0 / dropped) * dropped / 255.0,  # posterize: timm keeps 4 - int(4 level) bits
        lambda x: jnp.where(x < FILL, jnp.minimum(x + 110.0 / 255.0 * level, 1.0), x),  # solarize-add
        lambda x: sharpness(x, enhance),
        lambda x: rotate(x, 30.0 * level * sign),
        lambda x: _affine(x, jnp.array([[1.0, shear], [0.0, 1.0]]), zero),  # shear x
        lambda x: _affine(x, jnp.array([[1.0, 0.0], [shear, 1.0]]), zero),  # shear y
        lambda x: _affine(x, identity, jnp.array([shift * x.shape[1], 0.0])),  # translate x
        lambda x: _affine(x, identity, jnp.array([0.0, shift * x.shape[0]])),  # translate y
    ]
    return jax.lax.switch(index, ops, image)


NUM_RAND_OPS = 15  # timm's _RAND_INCREASING_TRANSFORMS, no identity


def rand_augment(key: jax.Array, image: jnp.ndarray, num_ops: int = 2, magnitude: float = 9.0) -> jnp.ndarray:
    """`num_ops` operations drawn uniformly, each at magnitude ~ N(magnitude, 0.5) of 10."""
    for k in jax.random.split(key, num_ops) if num_ops else ():
        k_op, k_mag, k_sign = jax.random.split(k, 3)
        level = jnp.clip(magnitude + MAGNITUDE_STD * jax.random.normal(k_mag), 0.0, MAX_MAGNITUDE)
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        image = _apply_op(jax.random.randint(k_op, (), 0, NUM_RAND_OPS), image, level / MAX_MAGNITUDE, sign)
    return image


def random_erase(key: jax.Array, image: jnp.ndarray, prob: float, area=(0.02, 1 / 3), ratio=(0.3, 3.3)) -> jnp.ndarray:
    """On a normalised image: with probability `prob`, one box becomes standard normal noise."""
    height, width = image.shape[:2]
    k_apply, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(key, 6)
    target = jax.random.uniform(k_area, (), minval=area[0], maxval=area[1]) * height * width
    aspect = jnp.exp(jax.random.uniform(k_ratio, (), minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1])))
    box_h = jnp.clip(jnp.round(jnp.sqrt(target * aspect)), 1, height)
    box_w = jnp.clip(jnp.round(jnp.sqrt(target / aspect)), 1, width)
    top = jnp.floor(jax.random.uniform(k_y, ()) * (height - box_h + 1))
    left = jnp.floor(jax.random.uniform(k_x, ()) * (width - box_w + 1))
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    inside = inside[..., None] & jax.random.bernoulli(k_apply, prob)
    return jnp.where(inside, jax.random.normal(k_noise, image.shape), image)


def train_view(key: jax.Array, image: jnp.ndarray, size: int, mean: jnp.ndarray, std: jnp.ndarray,
               erase_prob: float, num_ops: int = 2, magnitude: float = 9.0) -> jnp.ndarray:
    """uint8 [H, W, 3] -> normalised float [size, size, 3], every random choice from `key`."""
    k_crop, k_flip, k_aug, k_erase = jax.random.split(key, 4)
    x = random_resized_crop(k_crop, image.astype(jnp.float32) / 255.0, size)
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
    x = rand_augment(k_aug, jnp.clip(x, 0.0, 1.0), num_ops, magnitude)
    return random_erase(k_erase, (x - mean) / std, erase_prob)
