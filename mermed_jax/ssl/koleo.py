"""KoLeo regulariser (DINOv2), a term of ssl/objective.py."""

import jax.numpy as jnp


def koleo_loss(embeddings: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """KoLeo (DINOv2): -mean log distance of each embedding to its nearest neighbour in the batch.

    Spreads embeddings out; applied per global crop on the student's [B, d] unit embeddings.
    """
    x = embeddings.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nearest = x[jnp.argmax(dots, axis=1)]
    distances = jnp.linalg.norm(x - nearest + 1e-6, axis=-1)  # torch.pairwise_distance's eps
    return -jnp.mean(jnp.log(distances + eps))
