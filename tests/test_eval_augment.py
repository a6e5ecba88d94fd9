"""The RandAugment operations of eval/finetune_augment.py against PIL, which timm's RandAugment calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mermed_jax.eval import finetune_augment


def _image(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _to_unit(image: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(image, jnp.float32) / 255.0


def _pil_affine_channel(channel: np.ndarray, data: tuple) -> np.ndarray:
    """PIL bilinear affine of one float channel, filled with timm's 128 grey."""
    pil = Image.fromarray(channel.astype(np.float32), mode="F")
    return np.asarray(pil.transform(pil.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR,
                                    fillcolor=128.0))


def test_equalize_matches_pil():
    image = _image()
    ours = np.asarray(jnp.round(finetune_augment.equalize(_to_unit(image)) * 255.0)).astype(np.uint8)
    np.testing.assert_array_equal(ours, np.asarray(ImageOps.equalize(Image.fromarray(image))))


def test_sharpness_matches_pil_within_rounding():
    image = _image(1)
    for factor in (0.1, 1.9):
        reference = np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(factor), np.float32)
        ours = np.asarray(finetune_augment.sharpness(_to_unit(image), jnp.float32(factor))) * 255.0
        assert np.abs(ours - reference).max() <= 1.5  # PIL rounds the smoothed image, then the blend


def test_solarize_add_matches_timm():
    image = _image(2)
    level = 0.9
    ours = np.asarray(finetune_augment._apply_op(jnp.int32(8), _to_unit(image), jnp.float32(level), jnp.float32(1.0)))
    lut = [min(255, i + int(110 * level)) if i < 128 else i for i in range(256)]
    reference = np.asarray(Image.fromarray(image).point(lut * 3), np.float32)
    assert np.abs(ours * 255.0 - reference).max() <= 1.0  # timm truncates the added amount to an integer


def _compare_affine(ours: jnp.ndarray, image: np.ndarray, data: tuple) -> None:
    reference = np.stack([_pil_affine_channel(image[..., c].astype(np.float32), data) for c in range(3)], -1)
    diff = np.abs(np.asarray(ours) * 255.0 - reference)
    # Pixels mostly agree to float rounding; PIL and map_coordinates blend the fill at the edge differently.
    assert np.median(diff) < 1.0
    assert diff[3:-3, 3:-3].mean() < 4.0  # a 6.5-pixel translation reaches the filled edge here


def test_geometric_ops_match_pil_affine():
    image = _image(3)
    unit = _to_unit(image)
    level, sign, side = 0.9, -1.0, image.shape[0]
    shear, shift = 0.3 * level * sign, 0.45 * level * sign
    cases = {
        5: (1.0, shear, 0.0, 0.0, 1.0, 0.0),
        6: (1.0, 0.0, 0.0, shear, 1.0, 0.0),
        7: (1.0, 0.0, shift * side, 0.0, 1.0, 0.0),
        8: (1.0, 0.0, 0.0, 0.0, 1.0, shift * side),
    }
    for index, data in cases.items():
        ours = finetune_augment._apply_op(jnp.int32(index + 6), unit, jnp.float32(level), jnp.float32(sign))
        _compare_affine(ours, image, data)


def test_rotate_matches_pil_rotate():
    image = _image(4)
    ours = np.asarray(finetune_augment.rotate(_to_unit(image), jnp.float32(25.0))) * 255.0
    reference = np.stack([np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F").rotate(
        25.0, Image.Resampling.BILINEAR, fillcolor=128.0)) for c in range(3)], -1)
    diff = np.abs(ours - reference)
    assert np.median(diff) < 1.0
    assert diff[4:-4, 4:-4].mean() < 0.5


def test_rand_augment_compiles_keeps_shape_and_is_deterministic():
    batch = jnp.asarray(np.stack([_image(s) for s in range(4)]), jnp.float32) / 255.0
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    run = jax.jit(jax.vmap(finetune_augment.rand_augment))
    first, second = run(keys, batch), run(keys, batch)
    assert first.shape == batch.shape and first.dtype == batch.dtype
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert np.isfinite(np.asarray(first)).all()
