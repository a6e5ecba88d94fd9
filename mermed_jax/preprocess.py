"""Pixels to network inputs, the same way in training, evaluation and exported encoders.

Images travel as uint8 and are normalised on the device with the statistics of each row's own
modality, so one definition keeps a pretrained model and its users seeing the same inputs.
"""

import jax.numpy as jnp


def normalize_images(images: jnp.ndarray, modality: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    """[B, ..., 3] uint8 pixels (or floats in [0, 1]) -> float32 (x - mean[m]) / std[m] per row.

    modality: [B] ids; mean, std: [NUM_MODALITIES, 3] statistics of pixels in [0, 1].
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    shape = (images.shape[0],) + (1,) * (images.ndim - 2) + (3,)
    m = jnp.asarray(mean, jnp.float32)[modality].reshape(shape)
    s = jnp.asarray(std, jnp.float32)[modality].reshape(shape)
    return (x - m) / s
