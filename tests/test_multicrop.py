"""Multi-crop augmentation: torchvision's sampling rules, and agreement with the PIL reference."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.input_pipeline import pil_crop
from data_pipelines import multicrop
from data_pipelines.multicrop import CropParams, MultiCropConfig

TINY = MultiCropConfig(global_size=32, local_size=16, num_local=2)


def smooth_image(height: int = 96, width: int = 128) -> np.ndarray:
    """Low-frequency colour content, so resampling differences stay small away from edges."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
    g = 60 + 150 * x / width
    b = 200 - 150 * y / height
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def ours(image: np.ndarray, params: CropParams, size: int) -> np.ndarray:
    out = np.empty((size, size, 3), np.uint8)
    multicrop.apply_crop(multicrop._Pyramid(image), params, size, out)
    return out


def reference(image: np.ndarray, params: CropParams, size: int) -> np.ndarray:
    return np.asarray(pil_crop(Image.fromarray(image), params, size))


def test_multicrop_shapes_and_determinism():
    image = smooth_image()
    g1, l1 = multicrop.multicrop(image, multicrop.keyed_rng((0, 1, 2)), TINY)
    g2, l2 = multicrop.multicrop(image, multicrop.keyed_rng((0, 1, 2)), TINY)
    g3, _ = multicrop.multicrop(image, multicrop.keyed_rng((0, 1, 3)), TINY)
    assert g1.shape == (2, 32, 32, 3) and l1.shape == (2, 16, 16, 3)
    assert g1.dtype == l1.dtype == np.uint8
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(l1, l2)
    assert not np.array_equal(g1, g3)


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1), (20, 30, 3)])
def test_multicrop_accepts_grey_and_rgb(shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    g, loc = multicrop.multicrop(image, np.random.default_rng(0), TINY)
    assert g.shape == (2, 32, 32, 3) and loc.shape == (2, 16, 16, 3)


def test_multicrop_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        multicrop.multicrop(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), TINY)


def test_sample_box_follows_torchvision_rules():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = multicrop.sample_box(rng, 96, 128, (0.05, 0.2), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 96 and 0 <= left and left + w <= 128
        assert 0.04 <= h * w / (96 * 128) <= 0.21
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # A 2 x 100 strip has no valid box at these ratios: centre crop clamped to the ratio.
    assert multicrop.sample_box(rng, 2, 100, (0.5, 1.0), (3 / 4, 4 / 3)) == (0, 48, 2, 3)


def test_sampled_parameters_have_the_papers_rates():
    cfg = MultiCropConfig(global_blur_probs=(1.0, 0.1), local_blur_prob=0.5)
    rng = np.random.default_rng(1)
    n = 2000
    g0 = [multicrop.sample_crop(rng, 64, 64, cfg, "global", 0) for _ in range(n)]
    g1 = [multicrop.sample_crop(rng, 64, 64, cfg, "global", 1) for _ in range(n)]
    loc = [multicrop.sample_crop(rng, 64, 64, cfg, "local", 0) for _ in range(n)]
    assert all(p.blur_sigma is not None and 0.1 <= p.blur_sigma <= 1.0 for p in g0)
    assert abs(np.mean([p.blur_sigma is not None for p in g1]) - 0.1) < 0.03
    assert abs(np.mean([p.blur_sigma is not None for p in loc]) - 0.5) < 0.04
    assert abs(np.mean([p.jitter is not None for p in g0]) - 0.8) < 0.03
    assert abs(np.mean([p.flip for p in g0]) - 0.5) < 0.04
    assert all(-30 <= p.angle <= 30 for p in g0)
    jitter = dict(next(p.jitter for p in g0 if p.jitter))
    assert set(jitter) == {"brightness", "contrast", "saturation", "hue"}
    factors = [dict(p.jitter) for p in g0 if p.jitter]
    assert max(abs(f["hue"]) for f in factors) <= 0.02
    assert all(0.9 <= f["saturation"] <= 1.1 and 0.8 <= f["brightness"] <= 1.2 for f in factors)


def _inner_error(a: np.ndarray, b: np.ndarray, border: int) -> np.ndarray:
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return d[border:-border, border:-border]


@pytest.mark.parametrize("box,size", [((0, 0, 96, 128), 48), ((10, 20, 50, 40), 64), ((30, 30, 24, 24), 16),
                                      ((5, 5, 90, 90), 32)])
@pytest.mark.parametrize("flip", [False, True])
def test_geometry_matches_pil_reference(box, size, flip):
    image = smooth_image()
    params = CropParams(angle=0.0, box=box, flip=flip, jitter=None, blur_sigma=None)
    err = _inner_error(ours(image, params, size), reference(image, params, size), border=2)
    assert err.mean() < 1.5 and err.max() <= 12


@pytest.mark.parametrize("angle", [-30.0, -7.5, 12.0, 29.0])
def test_rotation_matches_pil_reference(angle):
    image = smooth_image()
    params = CropParams(angle=angle, box=(20, 30, 56, 64), flip=False, jitter=None, blur_sigma=None)
    err = _inner_error(ours(image, params, 48), reference(image, params, 48), border=2)
    assert err.mean() < 1.5 and np.percentile(err, 99) <= 8


@pytest.mark.parametrize("op,factor", [("brightness", 1.2), ("brightness", 0.8), ("contrast", 1.2),
                                       ("contrast", 0.8), ("saturation", 1.1), ("saturation", 0.9),
                                       ("hue", 0.02), ("hue", -0.02)])
def test_colour_jitter_matches_pil(op, factor):
    image = smooth_image()
    params = CropParams(angle=0.0, box=(0, 0, 96, 128), flip=False, jitter=((op, factor),), blur_sigma=None)
    plain = dataclasses.replace(params, jitter=None)
    # Compare the jitter's effect on identical inputs: both sides start from PIL's crop.
    base = reference(image, plain, 64)
    full = (0, 0, 64, 64)
    ours_out = ours(base, dataclasses.replace(params, box=full), 64)
    ref_out = reference(base, dataclasses.replace(params, box=full), 64)
    err = np.abs(ours_out.astype(np.int32) - ref_out.astype(np.int32))
    # Both round-trip hue through uint8 HSV, with different rounding: a few levels at most.
    assert err.mean() < 1.0 and np.percentile(err, 99) <= 4 and err.max() <= 10


@pytest.mark.parametrize("op,factor", [("brightness", 1.2), ("contrast", 0.8), ("saturation", 1.1), ("hue", -0.02)])
def test_colour_jitter_before_upsampling_matches_pil(op, factor):
    # A 24 x 32 box enlarged to 64: the jitter runs on the small grid, the reference after resizing.
    params = CropParams(angle=0.0, box=(20, 30, 24, 32), flip=False, jitter=((op, factor),), blur_sigma=None)
    image = smooth_image()
    err = _inner_error(ours(image, params, 64), reference(image, params, 64), border=2)
    assert err.mean() < 1.0 and err.max() <= 6


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0])
def test_blur_matches_pil(sigma):
    image = smooth_image(64, 64)
    params = CropParams(angle=0.0, box=(0, 0, 64, 64), flip=False, jitter=None, blur_sigma=sigma)
    err = _inner_error(ours(image, params, 64), reference(image, params, 64), border=3)
    assert err.mean() < 1.0 and err.max() <= 3


def test_rotation_exposes_black_corners_like_torchvision():
    image = np.full((40, 40, 3), 200, np.uint8)
    params = CropParams(angle=30.0, box=(0, 0, 40, 40), flip=False, jitter=None, blur_sigma=None)
    out = ours(image, params, 40)
    assert out[0, 0].max() == 0 and out[20, 20].min() == 200


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 70), width=st.integers(1, 70), size=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_any_image_size_gives_valid_crops(height, width, size, seed):
    cfg = MultiCropConfig(global_size=size, local_size=max(1, size // 2), num_local=2)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    g, loc = multicrop.multicrop(image, np.random.default_rng(seed), cfg)
    assert g.shape == (2, size, size, 3) and loc.shape == (2, max(1, size // 2), max(1, size // 2), 3)


def test_center_crop():
    image = smooth_image(96, 128)
    out = multicrop.center_crop(image, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    constant = np.full((50, 70), 77, np.uint8)
    np.testing.assert_array_equal(multicrop.center_crop(constant, 20), 77)
    # The centre of the output is the centre of the input.
    np.testing.assert_allclose(out[16, 16].astype(int), image[48, 64].astype(int), atol=6)


@pytest.mark.realdata
@pytest.mark.parametrize("pattern", ["derm_isic_uda1/images/*.jpg", "cxr_nih1000/NIH1000/train/*/*.png"])
def test_full_multicrop_matches_pil_reference_on_real_images(realdata, pattern):
    from data_pipelines import records

    cfg = MultiCropConfig()  # the paper's 2 x 224 + 10 x 96
    for path in sorted(realdata.glob(pattern))[:3]:
        image = records.decode_image(path.read_bytes(), channels=3)
        globals_, locals_ = multicrop.sample_multicrop(np.random.default_rng(0), *image.shape[:2], cfg)
        pyramid = multicrop._Pyramid(image)
        for params, size in [(p, cfg.global_size) for p in globals_] + [(p, cfg.local_size) for p in locals_]:
            out = np.empty((size, size, 3), np.uint8)
            multicrop.apply_crop(pyramid, params, size, out)
            err = np.abs(out.astype(np.int32) - reference(image, params, size).astype(np.int32))
            assert err.mean() < 3.0, (path.name, params)
