"""ViT backbone and projection head: sizes, shapes, torch-exact position-embedding resizing,
scan/remat equivalence, stochastic depth, registers, LayerScale and logical axis names."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mermed_jax.models import precision
from mermed_jax.models.head import HeadConfig, MultiCropNetwork, ProjectionHead
from mermed_jax.models.pos_embed import resize_pos_embed_grid
from mermed_jax.models.vit import PatchEmbed, ViT, ViTConfig, exact_gelu

TINY = dict(width=32, depth=3, num_heads=2, mlp_dim=64, img_size=32, precision="float32")


def _tiny(**kw):
    return ViTConfig.from_variant("Ti/8", **{**TINY, **kw})


def _init(cfg, size=32, batch=2):
    return ViT(cfg).init({"params": jax.random.key(0)}, jnp.zeros((batch, size, size, 3)), train=False)


def torch_bicubic_reference(grid, out_h, out_w, offset=0.1):
    """NumPy port of torch's upsample_bicubic2d (align_corners=False, scale_factor given)."""
    a = -0.75

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return 0.0

    in_h, in_w, dim = grid.shape
    ratio_h = 1.0 / ((out_h + offset) / in_h)
    ratio_w = 1.0 / ((out_w + offset) / in_w)
    out = np.zeros((out_h, out_w, dim))
    for oy in range(out_h):
        sy = ratio_h * (oy + 0.5) - 0.5
        iy, ty = math.floor(sy), sy - math.floor(sy)
        for ox in range(out_w):
            sx = ratio_w * (ox + 0.5) - 0.5
            ix, tx = math.floor(sx), sx - math.floor(sx)
            acc = np.zeros(dim)
            for m in range(-1, 3):
                wy = cubic(m - ty)
                yy = min(max(iy + m, 0), in_h - 1)
                for n in range(-1, 3):
                    xx = min(max(ix + n, 0), in_w - 1)
                    acc += wy * cubic(n - tx) * grid[yy, xx]
            out[oy, ox] = acc
    return out


def test_vit_b16_has_85_8m_parameters_and_shapes():
    cfg = ViTConfig.from_variant("B/16")
    for size in (224, 96):
        variables = jax.eval_shape(lambda s=size: _init(cfg, s, batch=3))
        out = jax.eval_shape(lambda v, s=size: ViT(cfg).apply(v, jnp.zeros((3, s, s, 3)), train=False), variables)
        assert out["cls"].shape == (3, 768) and out["patch_mean"].shape == (3, 768)
        assert out["cls"].dtype == jnp.float32
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(variables["params"])))
    assert count == 85_798_656  # timm vit_base_patch16_224, num_classes=0
    assert nn.unbox(variables["params"])["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("in_side,out_side", [(14, 6), (14, 16), (8, 4), (5, 5)])
def test_pos_embed_resize_matches_torch_bicubic(in_side, out_side):
    grid = np.random.default_rng(0).normal(size=(in_side, in_side, 3)).astype(np.float32)
    ours = np.asarray(resize_pos_embed_grid(jnp.asarray(grid), (out_side, out_side)))
    if in_side == out_side:
        np.testing.assert_array_equal(ours, grid)  # DINO skips resizing at the trained size
    else:
        np.testing.assert_allclose(ours, torch_bicubic_reference(grid, out_side, out_side), atol=1e-5)


def test_exact_gelu_and_layernorm_eps():
    x = np.linspace(-4, 4, 101)
    erf = np.vectorize(math.erf)
    np.testing.assert_allclose(np.asarray(exact_gelu(jnp.asarray(x))), 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-6)
    variables = _init(_tiny())
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 32)), jnp.float32)
    norm = nn.LayerNorm(epsilon=1e-6)
    ref = (tokens - tokens.mean(-1, keepdims=True)) / jnp.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(norm.apply({"params": {"scale": jnp.ones(32), "bias": jnp.zeros(32)}}, tokens)), np.asarray(ref), atol=1e-5)
    assert "norm" in variables["params"]


def test_every_parameter_has_logical_axis_names():
    variables = _init(_tiny(num_registers=2, layerscale_init=1e-5))
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(x.names) == x.value.ndim for x in leaves)


def _stack_blocks(params, depth):
    blocks = [params.pop(f"blocks_{i}") for i in range(depth)]
    params["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return params


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_give_the_same_outputs_and_gradients(remat):
    base = _tiny()
    params = nn.unbox(_init(base)["params"])
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    scanned_cfg = _tiny(scan_layers=True, remat_policy=remat)
    scanned_params = _stack_blocks(dict(params), base.depth)
    assert jax.tree.structure(nn.unbox(_init(scanned_cfg)["params"])) == jax.tree.structure(scanned_params)

    def loss(cfg, p):
        out = ViT(cfg).apply({"params": p}, images, train=False)
        return jnp.sum(out["cls"] ** 2) + jnp.sum(out["patch_mean"]) + jnp.sum(out["block_cls"][:, 0] ** 2)

    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned_cfg, p)))(scanned_params)
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-5)
    g0 = _stack_blocks(dict(g0), base.depth)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b) + 1e-7  # fp32; 5e-10 in float64


def test_block_cls_is_every_blocks_cls_through_the_final_norm():
    cfg = _tiny()
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    out = ViT(cfg).apply(_init(cfg), images, train=False)
    assert out["block_cls"].shape == (2, cfg.depth, cfg.width)
    np.testing.assert_allclose(out["block_cls"][:, -1], out["cls"], atol=1e-6)
    assert not np.allclose(out["block_cls"][:, 0], out["cls"], atol=1e-3)


def test_stochastic_depth_only_in_training():
    cfg = _tiny(drop_path_rate=0.5)
    variables = _init(cfg)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
    run = lambda key, train: ViT(cfg).apply(variables, images, train=train, rngs={"dropout": jax.random.key(key)})["cls"]  # noqa: E731
    np.testing.assert_array_equal(np.asarray(run(0, False)), np.asarray(run(1, False)))
    assert not np.allclose(np.asarray(run(0, True)), np.asarray(run(1, True)))
    no_drop = ViT(_tiny()).apply(variables, images, train=True)["cls"]
    np.testing.assert_array_equal(np.asarray(no_drop), np.asarray(run(0, False)))


def test_registers_layerscale_and_bf16_compute():
    cfg = _tiny(num_registers=4, layerscale_init=1e-5)
    params = nn.unbox(_init(cfg)["params"])
    assert params["reg_token"].shape == (1, 4, 32)
    assert params["blocks_0"]["ls1"]["gamma"].shape == (32,)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), jnp.float32)
    out32 = ViT(cfg).apply({"params": params}, images, train=False)
    out16 = ViT(_tiny(num_registers=4, layerscale_init=1e-5, precision="bfloat16")).apply({"params": params}, images, train=False)
    assert out16["cls"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16["cls"]), np.asarray(out32["cls"]), atol=0.1)


def test_head_is_normalised_and_uses_batch_statistics():
    head = ProjectionHead(HeadConfig(hidden_dim=16, bottleneck_dim=8))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 12)), jnp.float32)
    variables = head.init(jax.random.key(0), x)
    out, _ = head.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-5)
    # BatchNorm in training mode: a row's output depends on the other rows of the batch.
    out_half, _ = head.apply(variables, x[:3], mutable=["batch_stats"])
    assert not np.allclose(np.asarray(out_half), np.asarray(out[:3]), atol=1e-4)


def test_multicrop_network_runs_one_head_over_all_resolutions():
    net = MultiCropNetwork(_tiny(), HeadConfig(hidden_dim=16, bottleneck_dim=8))
    crops = [jnp.ones((2, 3, 32, 32, 3)), jnp.ones((4, 3, 16, 16, 3))]
    variables = net.init(jax.random.key(0), crops, train=False)
    out, _ = net.apply(variables, crops, train=True, mutable=["batch_stats"])
    assert out.shape == (6, 3, 8)


def test_patch_embed_is_the_stride_p_convolution():
    """PatchEmbed computes a VALID stride-p convolution as one dot (kernel [p, p, 3, width]), leftover
    pixels dropped; its gradients match too."""
    images = jax.random.normal(jax.random.key(0), (3, 40, 56, 3))
    module = PatchEmbed(width=8, patch_size=16, policy=precision.policy("float32"))
    params = module.init(jax.random.key(1), images)["params"]
    params = {"kernel": nn.unbox(params["kernel"]), "bias": jax.random.normal(jax.random.key(2), (8,))}

    def conv(p, x):
        y = jax.lax.conv_general_dilated(x, p["kernel"], (16, 16), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["bias"]

    ours = module.apply({"params": params}, images)
    assert ours.shape == (3, 2, 3, 8)
    np.testing.assert_allclose(ours, conv(params, images), rtol=1e-5, atol=1e-5)
    grad_ours = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, images) ** 2))(params)
    grad_conv = jax.grad(lambda p: jnp.sum(conv(p, images) ** 2))(params)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(grad_ours[name], grad_conv[name], rtol=1e-4, atol=1e-4)
