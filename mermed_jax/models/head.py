"""Projection head and the student/teacher network that wraps backbone and head.

The head follows the paper: a 3-layer MLP (hidden 2048, GELU, BatchNorm after each hidden layer)
down to a 256-d bottleneck, L2-normalised so that dot products with the memory are cosines
(x / max(||x||, 1e-6): the official head.py's F.normalize eps, not torch's 1e-12 default).
BatchNorm always runs in training mode, on all crops of the global batch at once (12 x B rows for
the student, 2 x B for the teacher), as the official PyTorch code does. Under jit with sharded
arrays a BatchNorm without an axis name already reduces over the global batch.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from mermed_jax.models import precision as precision_lib
from mermed_jax.models.vit import ViT, ViTConfig, exact_gelu

_dense_init = nn.initializers.truncated_normal(stddev=0.02)
NORMALIZE_EPS = 1e-6  # MerMED-FM head.py: nn.functional.normalize(x, dim=-1, eps=1e-6)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    use_bn: bool = True


class ProjectionHead(nn.Module):
    """Activations, BatchNorm and the normalisation in fp32 whatever the policy; the policy decides
    only its matmuls' operands."""

    config: HeadConfig
    precision: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dot_general = precision_lib.policy(self.precision).head().dot_general
        x = x.astype(jnp.float32)
        for i in range(cfg.num_layers - 1):
            x = nn.Dense(
                cfg.hidden_dim, dot_general=dot_general, name=f"mlp_{i}",
                kernel_init=nn.with_logical_partitioning(_dense_init, ("embed", "mlp")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            )(x)
            if cfg.use_bn:
                x = nn.BatchNorm(
                    use_running_average=False, momentum=0.9, epsilon=1e-5, name=f"bn_{i}",
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                )(x)
            x = exact_gelu(x)
        x = nn.Dense(
            cfg.bottleneck_dim, dot_general=dot_general, name=f"mlp_{cfg.num_layers - 1}",
            kernel_init=nn.with_logical_partitioning(_dense_init, ("mlp", "bottleneck")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("bottleneck",)),
        )(x)
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return x / jnp.maximum(norm, NORMALIZE_EPS)


class MultiCropNetwork(nn.Module):
    """Backbone once per crop resolution, then the head once on all crops together.

    `crops` is a list of [n_crops, B, H, W, 3] arrays, one per resolution; the output is
    [sum(n_crops), B, bottleneck] in the same crop order. Crops are merged into rows batch-major
    (row = b * n_crops + crop) so that rows stay on the device that holds their batch rows: a
    crop-major merge leaves XLA no way to keep the batch sharding, and it then replicates all
    activations and all-reduces them in every matmul (measured on ViT-L/16, FSDP over 8 devices:
    75 GB of all-reduce per step per device, and per-device temporaries near the 1-device figure).
    """

    backbone: ViTConfig
    head: HeadConfig
    pool: str = "cls"

    @nn.compact
    def __call__(self, crops: list[jnp.ndarray], *, train: bool) -> jnp.ndarray:
        backbone = ViT(self.backbone, name="backbone")
        features = []
        for group in crops:
            n_crops, batch = group.shape[:2]
            rows = jnp.swapaxes(group, 0, 1).reshape((batch * n_crops,) + group.shape[2:])
            out = backbone(rows, train=train)
            features.append(out[self.pool].reshape(batch, n_crops, -1))
        stacked = jnp.concatenate(features, axis=1)
        batch, n_total, width = stacked.shape
        embeddings = ProjectionHead(self.head, self.backbone.precision, name="head")(stacked.reshape(batch * n_total, width))
        return jnp.swapaxes(embeddings.reshape(batch, n_total, -1), 0, 1)
