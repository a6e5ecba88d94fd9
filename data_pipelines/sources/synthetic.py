"""Synthetic demo images for all seven modalities, with latent classes a probe can find.

Each image is a modality "look" (a CT body disc, CXR lung fields, an ultrasound fan, H&E colours,
a fundus disc, OCT layers, a skin lesion) filled with one of four textures: blobs, stripes,
a checkerboard or rings. The texture is the class. Its orientation, phase and position are random,
so the class survives what multi-crop does (flips, rotations, crops down to a fifth of the side,
colour jitter); it is what a self-supervised model has to learn to tell images apart.

`write_demo_data` writes them as real shards through the converter (same code path as user data);
it is the default data of `make demo`. Ids use a fixed key derived from the seed: synthetic images
identify nobody.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Iterator

import numpy as np

from data_pipelines import manifest as mf
from data_pipelines.modalities import MODALITIES, modality_id
from data_pipelines.shard_writer import ConvertOptions, convert
from data_pipelines.sources.base import DEFAULT_CHANNELS, Frame, Item, Source

CLASS_NAMES = ("blobs", "stripes", "checker", "rings")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1], y down the rows, x along the columns."""
    axis = np.linspace(-1.0, 1.0, size)
    return np.meshgrid(axis, axis, indexing="ij")


def texture(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size texture of class `label` in [0, 1], with random orientation, scale and phase."""
    y, x = _grid(size)
    theta = rng.uniform(0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    v = -x * np.sin(theta) + y * np.cos(theta)
    freq = rng.uniform(5.0, 8.0) * np.pi
    if label == 0:  # blobs: a sum of Gaussian spots
        out = np.zeros((size, size))
        for cy, cx in rng.uniform(-1, 1, (24, 2)):
            out += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * rng.uniform(0.04, 0.09) ** 2))
        out = np.clip(out, 0, 1)
    elif label == 1:  # stripes
        out = 0.5 + 0.5 * np.sin(freq * u + rng.uniform(0, 2 * np.pi))
    elif label == 2:  # checkerboard
        out = (np.sin(freq * u) * np.sin(freq * v) > 0).astype(np.float64)
    elif label == 3:  # rings around a random centre
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        out = 0.5 + 0.5 * np.sin(freq * np.hypot(y - cy, x - cx))
    else:
        raise ValueError(f"no texture for class {label}; classes are 0..{len(CLASS_NAMES) - 1}")
    return np.clip(out + rng.normal(0, 0.05, out.shape), 0, 1)


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.float64)


def _ct(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(t.shape[0])
    body = _ellipse(y, x, 0, 0, rng.uniform(0.7, 0.85), rng.uniform(0.8, 0.95))
    return body * (0.35 + 0.45 * t)


def _cxr(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(t.shape[0])
    lungs = _ellipse(y, x, 0, -0.42, 0.7, 0.3) + _ellipse(y, x, 0, 0.42, 0.7, 0.3)
    return np.clip(0.75 - 0.45 * lungs + 0.3 * lungs * t, 0, 1)


def _us(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(t.shape[0])
    radius, angle = np.hypot(y + 1, x), np.arctan2(x, y + 1)
    fan = (radius < 1.9) & (np.abs(angle) < rng.uniform(0.55, 0.7))
    speckle = rng.rayleigh(0.5, t.shape)
    return fan * np.clip(t * speckle, 0, 1)


def _path(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pink, purple = np.array([0.93, 0.7, 0.82]), np.array([0.45, 0.25, 0.6])
    return (1 - t)[..., None] * pink + t[..., None] * purple


def _cfp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(t.shape[0])
    disc = _ellipse(y, x, 0, 0, 0.95, 0.95)
    orange, vessel = np.array([0.85, 0.4, 0.15]), np.array([0.5, 0.1, 0.05])
    return disc[..., None] * ((1 - t)[..., None] * orange + t[..., None] * vessel)


def _oct(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, _ = _grid(t.shape[0])
    layers = 0.5 + 0.5 * np.sin(12 * y + rng.uniform(0, 2 * np.pi))
    retina = (np.abs(y - rng.uniform(-0.2, 0.2)) < 0.55).astype(np.float64)
    return retina * (0.15 * layers + 0.75 * t)


def _derm(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(t.shape[0])
    lesion = _ellipse(y, x, rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0.6, 0.8), rng.uniform(0.6, 0.8))
    skin, brown = np.array([0.9, 0.72, 0.6]), np.array([0.35, 0.2, 0.12])
    inside = (1 - t)[..., None] * skin * 0.8 + t[..., None] * brown
    return (1 - lesion)[..., None] * skin + lesion[..., None] * inside


LOOKS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "ct": _ct, "cxr": _cxr, "us": _us, "path": _path, "cfp": _cfp, "oct": _oct, "derm": _derm,
}


def synthetic_image(modality: str, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 HxWxC image of one modality and class (C from DEFAULT_CHANNELS)."""
    image = LOOKS[modality](texture(label, size, rng), rng)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return image[:, :, None] if image.ndim == 2 else image


class SyntheticSource(Source):
    """`count` images of one modality, classes in turn (balanced), reproducible from the seed."""

    def __init__(self, modality: str, *, count: int, size: int, seed: int):
        if modality not in LOOKS:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(LOOKS)}")
        self.modality = modality
        self.label_names = CLASS_NAMES
        self.channels = DEFAULT_CHANNELS[modality]
        self.count, self.size, self.seed = count, size, seed

    def items(self) -> list[Item]:
        return [Item(key=f"synthetic/{self.modality}/{i}", labels=(i % len(CLASS_NAMES),), ref=i)
                for i in range(self.count)]

    def load(self, item: Item) -> Iterator[Frame]:
        rng = np.random.default_rng([self.seed, modality_id(self.modality), item.ref])
        yield Frame(pixels=synthetic_image(self.modality, item.labels[0], self.size, rng))


def demo_key(seed: int) -> bytes:
    """The id key of demo data: fixed per seed, since synthetic images identify nobody."""
    return hashlib.sha256(f"mermed-demo-{seed}".encode()).digest()


def demo_jobs(
    out_dir: str | pathlib.Path,  # or a bucket URL
    images_per_modality: int = 256,
    size: int = 64,
    seed: int = 0,
    *,
    shard_size: int = 32,
    workers: int = 1,
    progress: bool = False,
) -> list[tuple[SyntheticSource, ConvertOptions]]:
    """The demo's conversions, OUT/demo_<modality>/ for all seven modalities (train/val/test), each
    keyed by demo_key(seed): what the local and the Beam converter are given."""
    return [(SyntheticSource(modality, count=images_per_modality, size=size, seed=seed),
             ConvertOptions(dataset=f"demo_{modality}", out_dir=out_dir, shard_size=shard_size, workers=workers,
                            seed=seed, progress=progress))
            for modality in MODALITIES]


def write_demo_data(
    out_dir: str | pathlib.Path,  # or a bucket URL
    images_per_modality: int = 256,
    size: int = 64,
    seed: int = 0,
    *,
    shard_size: int = 32,
    workers: int = 1,
    progress: bool = False,
) -> list[mf.Manifest]:
    """Writes the demo_jobs; returns the manifests.

    Re-running with the same arguments keeps what is already written (the converter resumes).
    """
    jobs = demo_jobs(out_dir, images_per_modality, size, seed, shard_size=shard_size, workers=workers,
                     progress=progress)
    return [convert(source, demo_key(seed), options).manifest for source, options in jobs]
