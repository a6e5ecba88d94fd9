"""Vision Transformer backbone, numerically interchangeable with timm/DINO ViTs.

Choices that keep PyTorch weights importable with equal outputs: exact (erf) GELU, LayerNorm eps
1e-6, a fused qkv projection with bias, a learned absolute position embedding that includes the
CLS position and is resized with torch's bicubic (see pos_embed.py), and the CLS token taken after
the final LayerNorm. Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `layers`)
so that sharding.py alone decides how they are laid out on a mesh.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mermed_jax.models import precision as precision_lib
from mermed_jax.models.pos_embed import resize_pos_embed_grid
from mermed_jax.sharding import dense_general_partitioning

# width, depth, heads, mlp_dim. "g" is the ViT-g of Zhai et al. (Scaling Vision Transformers).
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "g": (1408, 40, 16, 6144),
}

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_dense_init = nn.initializers.truncated_normal(stddev=0.02)
LN_EPS = 1e-6


def parse_variant(name: str) -> tuple[str, int]:
    """'B/16' -> ('B', 16), with an error that lists the valid variants."""
    match = re.fullmatch(r"(\w+)/(\d+)", name)
    if not match or match.group(1) not in VARIANTS:
        raise ValueError(f"model.variant={name!r}: expected '<{'|'.join(VARIANTS)}>/<patch size>'")
    return match.group(1), int(match.group(2))


def exact_gelu(x: jnp.ndarray) -> jnp.ndarray:
    return nn.gelu(x, approximate=False)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample, with a rate that may be traced."""

    deterministic: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, rate: jnp.ndarray | float) -> jnp.ndarray:
        if self.deterministic:
            return x
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        gamma = self.param(
            "gamma", nn.with_logical_partitioning(nn.initializers.constant(self.init_value), ("embed",)),
            (x.shape[-1],), jnp.float32,
        )
        return x * gamma.astype(x.dtype)


def _layer_norm(name: str, policy: precision_lib.Policy) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=policy.activations, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          policy: precision_lib.Policy) -> jnp.ndarray:
    """softmax(q k^T / sqrt(d)) v over [B, T, heads, d] inputs, with fp32 logits and softmax in every
    policy. jax.nn.dot_product_attention's XLA path computes the same, but pins bf16 logits to a
    dot algorithm that XLA:CPU runs outside its fast matmul library."""
    logits = policy.einsum("btnh,bsnh->bnts", q, k, result=jnp.float32, rounded_gradient=False)
    probs = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1)
    return policy.einsum("bnts,bsnh->btnh", probs, v, rounded_gradient=False)


class Attention(nn.Module):
    num_heads: int
    policy: precision_lib.Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        qkv = nn.DenseGeneral(
            (3, self.num_heads, head_dim), dtype=self.policy.activations, dot_general=self.policy.dot_general,
            name="qkv",
            kernel_init=dense_general_partitioning(_dense_init, ("embed", None, "heads", "kv")),
            bias_init=dense_general_partitioning(nn.initializers.zeros, (None, "heads", "kv")),
        )(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, self.policy)
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", "act_kv"))
        return nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.policy.activations, dot_general=self.policy.dot_general, name="proj",
            kernel_init=dense_general_partitioning(_dense_init, ("heads", "kv", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(out)


class Mlp(nn.Module):
    hidden_dim: int
    policy: precision_lib.Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        width = x.shape[-1]
        h = nn.Dense(
            self.hidden_dim, dtype=self.policy.activations, dot_general=self.policy.dot_general, name="fc1",
            kernel_init=nn.with_logical_partitioning(_dense_init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        )(x)
        h = nn.with_logical_constraint(exact_gelu(h), ("act_batch", "act_length", "act_mlp"))
        return nn.Dense(
            width, dtype=self.policy.activations, dot_general=self.policy.dot_general, name="fc2",
            kernel_init=nn.with_logical_partitioning(_dense_init, ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(h)


class Block(nn.Module):
    """Pre-norm transformer block; `drop_rate` is an input so one scanned block serves all depths."""

    num_heads: int
    mlp_dim: int
    layerscale_init: float | None
    deterministic: bool
    policy: precision_lib.Policy

    @nn.compact
    def __call__(self, x: jnp.ndarray, drop_rate: jnp.ndarray) -> jnp.ndarray:
        drop = DropPath(self.deterministic, name="drop_path")
        y = Attention(self.num_heads, self.policy, name="attn")(_layer_norm("norm1", self.policy)(x))
        if self.layerscale_init is not None:
            y = LayerScale(self.layerscale_init, name="ls1")(y)
        x = x + drop(y, drop_rate)
        y = Mlp(self.mlp_dim, self.policy, name="mlp")(_layer_norm("norm2", self.policy)(x))
        if self.layerscale_init is not None:
            y = LayerScale(self.layerscale_init, name="ls2")(y)
        x = x + drop(y, drop_rate)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


class _ScannedBlock(nn.Module):
    """Adapts Block to nn.scan's (carry, x) -> (carry, y) signature; y is the block's CLS token."""

    block_kwargs: dict

    @nn.compact
    def __call__(self, x: jnp.ndarray, drop_rate: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        x = Block(**self.block_kwargs, name="block")(x, drop_rate)
        return x, x[:, 0]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    img_size: int = 224  # the resolution the position grid is learned at
    num_registers: int = 0
    layerscale_init: float | None = None
    drop_path_rate: float = 0.0
    precision: str = "mixed"  # a policy of precision.py
    remat_policy: str = "none"
    scan_layers: bool = False

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "ViTConfig":
        name, patch = parse_variant(variant)
        width, depth, heads, mlp = VARIANTS[name]
        fields = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens [B, H/p, W/p, width], as one matmul.

    The parameters of a stride-p convolution (kernel [p, p, channels, width], bias), so timm and
    DINO weights load unchanged, but computed by flattening the patches: XLA:CPU lowers the
    convolution's weight gradient (a convolution with rhs dilation p) to a naive loop, which took
    60% of a ViT-S/16 train step; as a dot it is a few milliseconds. Pixels beyond the last whole
    patch are dropped, as a VALID convolution does.
    """

    width: int
    patch_size: int
    policy: precision_lib.Policy

    @nn.compact
    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        p = self.patch_size
        batch, height, width, channels = images.shape
        grid_h, grid_w = height // p, width // p
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            (p, p, channels, self.width), jnp.float32,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          (self.width,), jnp.float32)
        patches = images[:, : grid_h * p, : grid_w * p].astype(self.policy.matmul_operands)
        patches = patches.reshape(batch, grid_h, p, grid_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid_h, grid_w, p * p * channels)
        flat_kernel = kernel.reshape(p * p * channels, self.width)
        return self.policy.einsum("bhwk,kc->bhwc", patches, flat_kernel) + bias.astype(self.policy.activations)


class ViT(nn.Module):
    """Returns the CLS token and the mean patch token after the final norm, the mean patch token
    before it (the input of a fine-tuning head that replaces the final norm), and every block's CLS
    token through the final norm, [B, depth, width] (DINO's multi-block probe features; unused
    outputs cost nothing under jit)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        cfg = self.config
        policy = precision_lib.policy(cfg.precision)
        dtype = policy.activations
        if cfg.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={cfg.remat_policy!r}: expected one of {list(REMAT_POLICIES)}")
        x = PatchEmbed(cfg.width, cfg.patch_size, policy, name="patch_embed")(images)
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, cfg.width)

        side = cfg.img_size // cfg.patch_size
        pos_embed = self.param(
            "pos_embed", nn.with_logical_partitioning(_dense_init, (None, None, "embed")),
            (1, 1 + side * side, cfg.width), jnp.float32,
        )
        cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(nn.initializers.normal(1e-6), (None, None, "embed")),
            (1, 1, cfg.width), jnp.float32,
        )
        patch_pos = resize_pos_embed_grid(pos_embed[0, 1:].reshape(side, side, cfg.width), (grid_h, grid_w))
        x = x + patch_pos.reshape(1, grid_h * grid_w, cfg.width).astype(dtype)
        cls = (cls_token + pos_embed[:, :1]).astype(dtype)
        tokens = [jnp.broadcast_to(cls, (batch, 1, cfg.width))]
        if cfg.num_registers:
            registers = self.param(
                "reg_token", nn.with_logical_partitioning(nn.initializers.normal(1e-6), (None, None, "embed")),
                (1, cfg.num_registers, cfg.width), jnp.float32,
            )
            tokens.append(jnp.broadcast_to(registers.astype(dtype), (batch, cfg.num_registers, cfg.width)))
        x = jnp.concatenate(tokens + [x], axis=1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        x, block_cls = self._blocks(x, train)
        prefix = 1 + cfg.num_registers
        patch_mean_prenorm = x[:, prefix:].astype(jnp.float32).mean(axis=1)
        norm = _layer_norm("norm", policy)
        x = norm(x)
        return {
            "cls": x[:, 0].astype(jnp.float32),
            "patch_mean": x[:, prefix:].astype(jnp.float32).mean(axis=1),
            "patch_mean_prenorm": patch_mean_prenorm,
            "block_cls": norm(block_cls).astype(jnp.float32),
        }

    def _blocks(self, x: jnp.ndarray, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The tokens after the last block, and each block's CLS token [B, depth, width]."""
        cfg = self.config
        # Stochastic depth rises linearly over depth, as in DINO/timm.
        rates = jnp.linspace(0.0, cfg.drop_path_rate, cfg.depth) if cfg.depth > 1 else jnp.zeros((1,))
        block_kwargs = dict(
            num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, layerscale_init=cfg.layerscale_init,
            deterministic=not train or cfg.drop_path_rate == 0.0, policy=precision_lib.policy(cfg.precision),
        )
        saveable = REMAT_POLICIES[cfg.remat_policy]
        if cfg.scan_layers:
            body = _ScannedBlock
            if cfg.remat_policy != "none":
                body = nn.remat(body, policy=saveable, prevent_cse=False)
            scanned = nn.scan(
                body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=0, length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, cls_per_block = scanned(block_kwargs, name="blocks")(x, rates)
            return x, jnp.moveaxis(cls_per_block, 0, 1)
        block = Block if cfg.remat_policy == "none" else nn.remat(Block, policy=saveable)
        cls_per_block = []
        for i in range(cfg.depth):
            x = block(**block_kwargs, name=f"blocks_{i}")(x, rates[i])
            cls_per_block.append(x[:, 0])
        return x, jnp.stack(cls_per_block, axis=1)

