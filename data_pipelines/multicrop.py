"""The MerMED-FM multi-crop augmentation, on uint8 images with OpenCV.

Per crop, in the order of the official torchvision pipeline: rotation by an angle in
[-rotation, rotation] degrees (same canvas, black corners), RandomResizedCrop with bicubic
resampling, horizontal flip, colour jitter (brightness, contrast, saturation, hue in a random
order) with probability `jitter_prob`, Gaussian blur with a sigma in `blur_sigma` and a
probability per crop kind (1.0 / 0.1 for the two global crops, 0.5 for local crops).

Why it is fast: parameters are sampled first, exactly as torchvision samples them. Rotation,
crop and flip are composed into one 2x3 matrix and applied by one `cv2.warpAffine` (nearest,
torchvision's rotation default) that produces only the crop box, on its own pixel grid, instead
of rotating the whole image; one SIMD bicubic `cv2.resize` then writes the crop into the batch
buffer. (A single bicubic warpAffine to the output would resample once, but OpenCV's bicubic warp
is scalar code and was 10-25x slower than this pair.) Downscaling reads from a 2x pyramid level
(area averaging), so no bicubic pass shrinks by 2x or more: that keeps most of the antialiasing
PIL's bicubic resize has. The colour ops are saturating uint8 blends (`cv2.addWeighted`) and a
uint8 HSV round trip, PIL's own semantics; being pointwise, they run before the resize when that
enlarges (small images), on fewer pixels. `bench/input_pipeline.py` holds the PIL reference
this is measured against; tests/test_multicrop.py checks both agree for the same parameters.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import cv2
import numpy as np

from data_pipelines.batch_spec import MultiCropConfig

_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class CropParams:
    """Everything random about one crop; `apply_crop` and the PIL reference both consume it.

    `box` is (top, left, height, width) in integer pixels of the rotated image, as torchvision's
    RandomResizedCrop.get_params returns it. `jitter` is None (not applied) or the factors in the
    order they are applied, e.g. (("hue", 0.01), ("brightness", 1.1), ...).
    """

    angle: float
    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple[tuple[str, float], ...] | None
    blur_sigma: float | None


def sample_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: 10 tries at area/aspect, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop(
    rng: np.random.Generator, height: int, width: int, cfg: MultiCropConfig, kind: str, index: int
) -> CropParams:
    """Draws one crop's parameters in torchvision's order: rotate, crop, flip, jitter, blur."""
    angle = float(rng.uniform(-cfg.rotation, cfg.rotation))
    scale = cfg.local_scale if kind == "local" else cfg.global_scale
    box = sample_box(rng, height, width, scale, cfg.ratio)
    flip = bool(rng.random() < cfg.flip_prob)
    jitter = None
    if rng.random() < cfg.jitter_prob:
        strengths = {"brightness": cfg.brightness, "contrast": cfg.contrast, "saturation": cfg.saturation}
        factors = {name: float(rng.uniform(max(0.0, 1 - s), 1 + s)) for name, s in strengths.items()}
        factors["hue"] = float(rng.uniform(-cfg.hue, cfg.hue))
        jitter = tuple((_JITTER_OPS[i], factors[_JITTER_OPS[i]]) for i in rng.permutation(4))
    blur_sigma = None
    if rng.random() < cfg.blur_prob(kind, index):
        blur_sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
    return CropParams(angle=angle, box=box, flip=flip, jitter=jitter, blur_sigma=blur_sigma)


def sample_multicrop(
    rng: np.random.Generator, height: int, width: int, cfg: MultiCropConfig
) -> tuple[list[CropParams], list[CropParams]]:
    """Parameters of all global then all local crops of one image."""
    globals_ = [sample_crop(rng, height, width, cfg, "global", k) for k in range(cfg.num_global)]
    locals_ = [sample_crop(rng, height, width, cfg, "local", k) for k in range(cfg.num_local)]
    return globals_, locals_


def warp_matrix(params: CropParams, height: int, width: int, out_h: int, out_w: int) -> np.ndarray:
    """The 2x3 map from an out_h x out_w grid over the crop box to source pixels.

    Composes flip, crop and rotation (PIL's `rotate` about the image centre, counter-clockwise
    for positive angles) in continuous coordinates where pixel i spans [i, i+1) (PIL's
    convention), then shifts half a pixel at both ends because OpenCV puts centres on integers.
    """
    top, left, h, w = params.box
    sx, sy = w / out_w, h / out_h
    # Grid coordinate -> rotated-image coordinate; a flip mirrors x within the box.
    a = np.array([[-sx if params.flip else sx, 0.0, left + (w if params.flip else 0.0)],
                  [0.0, sy, top]])
    theta = math.radians(params.angle)
    c, s = math.cos(theta), math.sin(theta)
    cx, cy = width / 2, height / 2
    r = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]])
    m = r[:, :2] @ a
    m[:, 2] += r[:, 2]
    m[:, 2] += 0.5 * (m[:, 0] + m[:, 1]) - 0.5
    return m


class _Pyramid:
    """The source image and its 2x area-averaged reductions, built on first use."""

    def __init__(self, image: np.ndarray):
        self.levels = [image]

    def level_for(self, shrink: float) -> int:
        """Deepest level at which the remaining bicubic shrink factor is still >= 1."""
        level = 0
        while shrink >= 2.0 and min(self.levels[level].shape[:2]) >= 4:
            if level + 1 == len(self.levels):
                prev = self.levels[level]
                self.levels.append(
                    cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA))
            level += 1
            shrink /= 2.0
        return level


def _adjust(image: np.ndarray, name: str, factor: float) -> np.ndarray:
    """One colour-jitter op with PIL's ImageEnhance / torchvision adjust_hue semantics (uint8)."""
    if name == "brightness":
        return cv2.addWeighted(image, factor, image, 0.0, 0.0)
    if name == "contrast":
        r, g, b, _ = cv2.mean(image)  # PIL's L = .299 R + .587 G + .114 B, mean rounded
        mean = float(int(0.299 * r + 0.587 * g + 0.114 * b + 0.5))
        return cv2.addWeighted(image, factor, image, 0.0, mean * (1.0 - factor))
    if name == "saturation":
        gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)
    if name == "hue":
        shift = int(np.int8(int(factor * 255)).view(np.uint8))
        if shift == 0:
            return image
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        hsv[..., 0] += np.uint8(shift)  # wraps modulo 256, like PIL's uint8 hue channel
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    raise ValueError(f"unknown colour-jitter op {name!r}")


def _jitter(image: np.ndarray, ops: tuple[tuple[str, float], ...]) -> np.ndarray:
    for name, factor in ops:
        image = _adjust(image, name, factor)
    return image


def apply_crop(pyramid: _Pyramid, params: CropParams, size: int, out: np.ndarray) -> None:
    """Renders one crop of `pyramid`'s image into `out` (uint8 [size, size, 3]).

    Geometry in two OpenCV calls: one `warpAffine` (nearest, as torchvision's RandomRotation
    default) rotates, crops and flips onto the crop box's own pixel grid at the chosen pyramid
    level, then one SIMD bicubic `cv2.resize` brings that grid to size x size. This is the
    reference's order of resampling; a single bicubic warpAffine straight to the output would
    resample once but OpenCV's bicubic warp is scalar code, 10-25x slower than this pair.
    """
    height, width = pyramid.levels[0].shape[:2]
    _, _, h, w = params.box
    src = pyramid.levels[pyramid.level_for(min(h, w) / size)]
    fx, fy = src.shape[1] / width, src.shape[0] / height
    grid_h, grid_w = max(1, int(round(h * fy))), max(1, int(round(w * fx)))
    m = warp_matrix(params, height, width, grid_h, grid_w)
    # Level pixels are larger by (1/fx, 1/fy): rescale the map's source side.
    m[:, 2] += 0.5
    m[0] *= fx
    m[1] *= fy
    m[:, 2] -= 0.5
    patch = cv2.warpAffine(src, m, (grid_w, grid_h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    # Colour jitter is pointwise (contrast adds one global mean), so it commutes with resizing up
    # to rounding: run it on whichever of the grid and the output has fewer pixels.
    early = params.jitter is not None and grid_h * grid_w < size * size
    if early:
        patch = _jitter(patch, params.jitter)
    cv2.resize(patch, (size, size), dst=out, interpolation=cv2.INTER_CUBIC)
    image = out
    if params.jitter is not None and not early:
        image = _jitter(image, params.jitter)
    if params.blur_sigma is not None:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
    if image is not out:
        out[...] = image


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1 or HxWx3 uint8 -> contiguous HxWx3 uint8; other layouts are an error."""
    if image.dtype != np.uint8:
        raise ValueError(f"augmentation takes uint8 images, got {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ValueError(f"expected an HxW, HxWx1 or HxWx3 image, got shape {image.shape}")


def multicrop(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: MultiCropConfig,
    global_out: np.ndarray | None = None,
    local_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All crops of one image: uint8 [num_global, G, G, 3] and [num_local, L, L, 3].

    Pass `global_out` / `local_out` (views into a batch buffer) to render in place.
    """
    image = as_rgb(image)
    if global_out is None:
        global_out = np.empty((cfg.num_global, cfg.global_size, cfg.global_size, 3), np.uint8)
    if local_out is None:
        local_out = np.empty((cfg.num_local, cfg.local_size, cfg.local_size, 3), np.uint8)
    globals_, locals_ = sample_multicrop(rng, image.shape[0], image.shape[1], cfg)
    pyramid = _Pyramid(image)
    for k, params in enumerate(globals_):
        apply_crop(pyramid, params, cfg.global_size, global_out[k])
    for k, params in enumerate(locals_):
        apply_crop(pyramid, params, cfg.local_size, local_out[k])
    return global_out, local_out


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Evaluation view: resize the short side to size / crop_fraction, take the centre size x size.

    Done as one resize of the centre region (area averaging when shrinking, bicubic when
    enlarging), which equals resize-then-crop up to rounding of the region's edges.
    """
    image = as_rgb(image)
    height, width = image.shape[:2]
    side = min(height, width) * crop_fraction
    side_h, side_w = max(1, int(round(side))), max(1, int(round(side)))
    top, left = (height - side_h) // 2, (width - side_w) // 2
    region = image[top:top + side_h, left:left + side_w]
    interpolation = cv2.INTER_AREA if side_h > size else cv2.INTER_CUBIC
    return cv2.resize(region, (size, size), interpolation=interpolation)


def keyed_rng(key: Sequence[int]) -> np.random.Generator:
    """A Philox generator keyed by a tuple of ints (seed, host, step, slot, ...).

    Each image's crops depend only on its key, never on what ran before, which is what makes a
    restored pipeline reproduce the uninterrupted one.
    """
    return np.random.Generator(np.random.Philox(key=np.random.SeedSequence(list(key)).generate_state(2, np.uint64)))
