"""`load_encoder(path)`: an exported file -> an ExportedEncoder, a callable that embeds images of a given modality.

The callable owns the whole preprocessing contract so users cannot get it subtly wrong: uint8
pixels are scaled to [0, 1] (float input is taken to be [0, 1] already), then normalised with the
statistics of each image's modality recorded in the export's JSON, then embedded in fp32.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage
from data_pipelines.modalities import MODALITIES, modality_id
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import Tree, unflatten
from mermed_jax.interop.weight_export import ARCH_FIELDS, config_path
from mermed_jax.models.vit import ViT, ViTConfig
from mermed_jax.preprocess import normalize_images

POOLS = ("cls", "patch_mean", "patch_mean_prenorm")


@functools.partial(jax.jit, static_argnames=("config", "pool"))
def _embed(config: ViTConfig, pool: str, params: Tree, images: jnp.ndarray, modality: jnp.ndarray,
           mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    x = normalize_images(images, modality, mean, std)
    return ViT(config).apply({"params": params}, x, train=False)[pool]


@dataclasses.dataclass(frozen=True)
class ExportedEncoder:
    config: ViTConfig
    params: Tree
    pixel_mean: np.ndarray  # [NUM_MODALITIES, 3], for pixels in [0, 1]
    pixel_std: np.ndarray

    def __call__(self, images: np.ndarray, modality: str | Sequence[str], *, pool: str = "cls") -> np.ndarray:
        """[B, H, W, 3] images (uint8, or float in [0, 1]) -> [B, width] float32 embeddings.

        `modality` names one modality for the whole batch or one per image; H and W must be
        multiples of the patch size (other sizes use the resized position grid).
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected [B, H, W, 3], got shape {images.shape}")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: expected one of {POOLS}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images: expected uint8 or float pixels, got {images.dtype}")
        names = [modality] * len(images) if isinstance(modality, str) else list(modality)
        if len(names) != len(images):
            raise ValueError(f"modality: {len(names)} names for {len(images)} images")
        ids = np.array([modality_id(name) for name in names])
        out = _embed(self.config, pool, self.params, images, ids, self.pixel_mean, self.pixel_std)
        return np.asarray(out)


def load_encoder(path: str | os.PathLike) -> ExportedEncoder:
    """An ExportedEncoder from an export (.msgpack, .safetensors or .pth) and the config JSON beside it."""
    meta_path = config_path(path)
    if not storage.exists(meta_path):
        raise CheckpointError(f"{path}: no config JSON beside it ({meta_path}); export with mermed_jax.export")
    meta = json.loads(storage.read_text(meta_path))
    config = ViTConfig(**{field: meta["model"][field] for field in ARCH_FIELDS}, precision="float32")
    weights = load_weights(path, config)
    if weights.report.missing:
        raise CheckpointError(f"{path}: the backbone is incomplete\n{weights.report.summary()}")
    norm = meta["normalization"]
    mean = np.array([norm[m]["mean"] for m in MODALITIES], np.float32)
    std = np.array([norm[m]["std"] for m in MODALITIES], np.float32)
    return ExportedEncoder(config, unflatten(weights.backbone), mean, std)
