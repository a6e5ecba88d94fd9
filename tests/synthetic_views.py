"""Synthetic images with latent classes that survive MaSSL's augmentations, and their views.

Class k of an image is an orientation (horizontal or vertical stripes) times a spatial frequency
(low or high), drawn with a random phase, tint, contrast and noise. Crops, flips and resizing keep
both factors recognisable, while the nuisances keep a random network's features from separating
them well. Each view also gets its own photometric jitter (brightness, contrast, per-channel gain,
sometimes grey), as MaSSL's colour augmentations do: an image's tint and brightness are then no
reliable cue for matching its views, and self-supervision has to use the stripes. Used by the
core's learning test, independent of the data pipeline.
"""

import cv2
import numpy as np

NUM_CLASSES = 4


def make_images(rng: np.random.Generator, n: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, NUM_CLASSES, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        vertical, high = label % 2, label // 2
        freq = (7.0 if high else 2.5) * rng.uniform(0.85, 1.15)
        coord = xx if vertical else yy
        wave = np.sin(2 * np.pi * (freq * coord + rng.uniform()))
        tint = rng.uniform(0.3, 1.0, 3)
        contrast = rng.uniform(0.4, 1.0)
        base = rng.uniform(0.2, 0.8)
        img = base + 0.35 * contrast * wave[..., None] * tint + rng.normal(0, 0.08, (size, size, 3))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, out: int, scale: tuple[float, float]) -> np.ndarray:
    h, w = image.shape[:2]
    area = rng.uniform(*scale) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = cv2.resize(image[y:y + ch, x:x + cw], (out, out), interpolation=cv2.INTER_CUBIC)
    return crop[:, ::-1] if rng.uniform() < 0.5 else crop


def photometric_jitter(rng: np.random.Generator, view: np.ndarray) -> np.ndarray:
    """Per-view brightness, contrast and channel gains around the view's mean; grey 20% of the time."""
    x = view.astype(np.float32) / 255.0
    mean = x.mean()
    gains = rng.uniform(0.6, 1.4) * rng.uniform(0.7, 1.3, 3)
    x = mean + (x - mean) * gains + rng.uniform(-0.2, 0.2)
    if rng.uniform() < 0.2:
        x = np.repeat(x.mean(axis=-1, keepdims=True), 3, axis=-1)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def view(rng: np.random.Generator, image: np.ndarray, out: int, scale: tuple[float, float], jitter: bool = True) -> np.ndarray:
    crop = random_resized_crop(rng, image, out, scale)
    return photometric_jitter(rng, crop) if jitter else crop


def multicrop_batch(
    rng, images, modality, *, n_global, global_size, n_local, local_size,
    global_scale=(0.3, 1.0), local_scale=(0.1, 0.3), jitter=True,
) -> dict:
    return {
        "global": np.stack([[view(rng, im, global_size, global_scale, jitter) for _ in range(n_global)] for im in images]),
        "local": np.stack([[view(rng, im, local_size, local_scale, jitter) for _ in range(n_local)] for im in images]),
        "modality": np.asarray(modality, np.int32),
    }


def centre_views(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
