"""KoLeo regulariser (DINOv2), a term of ssl/objective.py, as MerMED-FM's koleo.py computes it.

Matched to the official code: no re-normalisation inside (its F.normalize is commented out; the
inputs are the projection head's unit embeddings), nearest neighbour by the largest dot product
with the diagonal set to -1, torch.nn.PairwiseDistance(p=2, eps=1e-8) to that neighbour (the eps
is added to the difference vector, not to the norm), then -mean log(distance + 1e-8).
Deliberate differences: the dot products run in float32 (the official autocasts them to float16,
which only matters for near-ties of the argmax), and the batch is the global batch, not one GPU's
rows (the official's neighbour search, and so its value, depends on the number of GPUs; ours does
not depend on the mesh). The paper recipe gives KoLeo weight 0.
"""

import jax.numpy as jnp

PAIRWISE_DISTANCE_EPS = 1e-8  # torch.nn.PairwiseDistance(2, eps=1e-8) in the official koleo.py
LOG_EPS = 1e-8  # KoLeoLoss.forward(eps=1e-8)


def koleo_loss(embeddings: jnp.ndarray, eps: float = LOG_EPS) -> jnp.ndarray:
    """KoLeo: -mean log distance of each embedding to its nearest neighbour in the batch.

    Spreads embeddings out; applied per global crop on the student's [B, d] unit embeddings
    (the objective averages it over the global crops).
    """
    x = embeddings.astype(jnp.float32)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nearest = x[jnp.argmax(dots, axis=1)]
    distances = jnp.linalg.norm(x - nearest + PAIRWISE_DISTANCE_EPS, axis=-1)
    return -jnp.mean(jnp.log(distances + eps))
