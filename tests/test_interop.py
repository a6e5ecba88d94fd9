"""Weights in and out: PyTorch (timm / DINO / MerMED) import, export, round trips, hostile files.

The reference forward pass below is written here, in NumPy and in timm's tensor layout, without
using any of mermed_jax's conversion code, so that agreement with it checks the name and layout
tables rather than restating them. Its bicubic resize follows torch's upsample_bicubic2d
(A = -0.75, half-pixel centres, clamped taps, scale from the given scale_factor) independently
of models/pos_embed.py.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hostile import code_running_pickle
from safetensors import numpy as st_numpy
from scipy.special import erf

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax.interop import files
from mermed_jax.interop.exported_encoder import load_encoder
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import (
    backbone_shapes,
    flatten,
    head_shapes,
    scan_blocks,
    to_numpy,
    unflatten,
    unroll_blocks,
)
from mermed_jax.interop.weight_export import export_params
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.networks import backbone_config, build_networks
from mermed_jax.models.vit import ViT, ViTConfig
from mermed_jax.training.init_from_pretrained import initialize_from_pretrained
from mermed_jax.training.train_state import TrainState

SMALL = ViTConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4, img_size=32, precision="float32")
SMALL_HEAD = HeadConfig(hidden_dim=32, bottleneck_dim=16)
B16 = ViTConfig.from_variant("B/16", precision="float32")


# --------------------------------------------------------------------------- NumPy reference (timm layout)

def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a, 0.0))


def torch_bicubic_1d(v: np.ndarray, out_size: int, scale_factor: float) -> np.ndarray:
    """torch's bicubic along axis 0 of v, for F.interpolate(scale_factor=...) (align_corners=False)."""
    ratio = np.float32(1.0 / scale_factor)
    out = []
    for i in range(out_size):
        src = float(ratio * np.float32(i + 0.5) - np.float32(0.5))
        base = int(np.floor(src))
        taps = [base - 1, base, base + 1, base + 2]
        weights = _cubic(np.array([src - t for t in taps]))
        out.append(sum(w * v[min(max(t, 0), len(v) - 1)] for w, t in zip(weights, taps)))
    return np.stack(out)


def dino_interpolate_pos(pos: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """DINO's interpolate_pos_encoding: bicubic with scale_factor (g + 0.1) / side."""
    side = int(np.sqrt(pos.shape[1] - 1))
    if side * side == pos.shape[1] - 1 and (gh, gw) == (side, side):
        return pos
    grid = pos[0, 1:].reshape(side, side, -1).astype(np.float64)
    grid = torch_bicubic_1d(grid, gh, (gh + 0.1) / side)
    grid = np.swapaxes(torch_bicubic_1d(np.swapaxes(grid, 0, 1), gw, (gw + 0.1) / side), 0, 1)
    return np.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)


def _ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w + b


def reference_forward(sd: dict, images_nchw: np.ndarray, *, num_heads: int, num_registers: int = 0) -> dict:
    """timm VisionTransformer.forward_features + token pooling, float64, straight from the state_dict."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]
    width, channels, p, _ = w.shape
    b, _, h, wd = images_nchw.shape
    gh, gw = h // p, wd // p
    patches = images_nchw.astype(np.float64).reshape(b, channels, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
    x = patches.reshape(b, gh * gw, -1) @ w.reshape(width, -1).T + sd["patch_embed.proj.bias"]
    prefix = [np.broadcast_to(sd["cls_token"], (b, 1, width))]
    if num_registers:
        prefix.append(np.broadcast_to(sd["reg_token"], (b, num_registers, width)))
    x = np.concatenate(prefix + [x], axis=1)
    pos = sd["pos_embed"]
    if pos.shape[1] != x.shape[1]:
        assert not num_registers
        pos = dino_interpolate_pos(pos, gh, gw)
    x = x + pos
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = width // num_heads
    for i in range(depth):
        g = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = _ln(x, g("norm1.weight"), g("norm1.bias"))
        qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(b, -1, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
        logits = qkv[0] @ np.swapaxes(qkv[1], -1, -2) * hd ** -0.5
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        y = (attn @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, -1, width)
        y = y @ g("attn.proj.weight").T + g("attn.proj.bias")
        x = x + (y * g("ls1.gamma") if f"blocks.{i}.ls1.gamma" in sd else y)
        y = _ln(x, g("norm2.weight"), g("norm2.bias")) @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        y = y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        x = x + (y * g("ls2.gamma") if f"blocks.{i}.ls2.gamma" in sd else y)
    x = _ln(x, sd["norm.weight"], sd["norm.bias"])
    return {"cls": x[:, 0], "patch_mean": x[:, 1 + num_registers:].mean(1)}


def random_timm_state_dict(rng: np.random.Generator, width: int, depth: int, mlp: int, patch: int, grid: int) -> dict:
    """A timm ViT state_dict made in NumPy; attention logits have std ~2, far from uniform yet fp32-stable."""
    def n(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    sd = {"patch_embed.proj.weight": n(width, 3, patch, patch, std=0.05), "patch_embed.proj.bias": n(width),
          "cls_token": n(1, 1, width, std=0.5), "pos_embed": n(1, 1 + grid * grid, width, std=0.5),
          "norm.weight": 1 + n(width, std=0.1), "norm.bias": n(width, std=0.1)}
    for i in range(depth):
        sd.update({
            f"blocks.{i}.norm1.weight": 1 + n(width, std=0.1), f"blocks.{i}.norm1.bias": n(width, std=0.1),
            f"blocks.{i}.attn.qkv.weight": n(3 * width, width, std=0.05), f"blocks.{i}.attn.qkv.bias": n(3 * width),
            f"blocks.{i}.attn.proj.weight": n(width, width), f"blocks.{i}.attn.proj.bias": n(width),
            f"blocks.{i}.norm2.weight": 1 + n(width, std=0.1), f"blocks.{i}.norm2.bias": n(width, std=0.1),
            f"blocks.{i}.mlp.fc1.weight": n(mlp, width), f"blocks.{i}.mlp.fc1.bias": n(mlp),
            f"blocks.{i}.mlp.fc2.weight": n(width, mlp), f"blocks.{i}.mlp.fc2.bias": n(width),
        })
    return sd


def dino_head_state_dict(rng: np.random.Generator, width: int, hidden: int, bottleneck: int) -> dict:
    """DINOHead.mlp with BatchNorm: Linear(0), BN(1), GELU, Linear(3), BN(4), GELU, Linear(6)."""
    sd = {}
    for index, (fan_in, fan_out) in zip((0, 3, 6), ((width, hidden), (hidden, hidden), (hidden, bottleneck))):
        sd[f"head.mlp.{index}.weight"] = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
        sd[f"head.mlp.{index}.bias"] = rng.standard_normal(fan_out, dtype=np.float32)
    for index in (1, 4):
        sd.update({f"head.mlp.{index}.weight": rng.random(hidden, dtype=np.float32),
                   f"head.mlp.{index}.bias": rng.random(hidden, dtype=np.float32),
                   f"head.mlp.{index}.running_mean": rng.random(hidden, dtype=np.float32),
                   f"head.mlp.{index}.running_var": rng.random(hidden, dtype=np.float32) + 0.5,
                   f"head.mlp.{index}.num_batches_tracked": np.array(7, np.int64)})
    return sd


def _ours(config: ViTConfig, params, images_nhwc: np.ndarray) -> dict:
    out = jax.jit(lambda p, x: ViT(config).apply({"params": p}, x, train=False))(params, jnp.asarray(images_nhwc))
    return {k: np.asarray(v) for k, v in out.items()}


def _random_leaves(shapes: dict, seed: int) -> dict:
    """Every leaf random (scales and variances near 1), so no layout error can hide behind init zeros."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in shapes.items():
        noise = rng.standard_normal(shape).astype(np.float32) * 0.05
        out[path] = 1 + noise if path[-1] in ("scale", "var") else noise
    return unflatten(out)


def _random_model(config: ViTConfig, seed: int = 0) -> dict:
    params = _random_leaves(backbone_shapes(config), seed)
    return scan_blocks(params, config.depth) if config.scan_layers else params


def _random_head(config: HeadConfig, width: int, seed: int = 1) -> tuple[dict, dict]:
    param_shapes, stat_shapes = head_shapes(config, width)
    return _random_leaves(param_shapes, seed), _random_leaves(stat_shapes, seed + 1)


# --------------------------------------------------------------------------- (a) timm file -> our ViT-B/16

@pytest.fixture(scope="module")
def timm_b16(tmp_path_factory):
    sd = random_timm_state_dict(np.random.default_rng(0), 768, 12, 3072, 16, 14)
    path = tmp_path_factory.mktemp("timm") / "vit_b16.safetensors"
    st_numpy.save_file(sd, str(path))
    return sd, path, load_weights(path, B16, strict=True)


@pytest.mark.parametrize("size", [224, 96])
def test_timm_checkpoint_matches_numpy_reference_b16(timm_b16, size):
    sd, _, weights = timm_b16
    params = jax.tree.map(jnp.asarray, unflatten(weights.backbone))
    image = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
    ours = _ours(B16, params, image)
    ref = reference_forward(sd, image.transpose(0, 3, 1, 2), num_heads=12)
    for key in ("cls", "patch_mean"):
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-4, rtol=0)
    assert np.abs(ref["cls"]).max() > 0.5  # outputs are not trivially small


# Relative error ||ours - reference|| / ||reference|| of a timm checkpoint's output under each policy
# (measured at 96 px: mixed RTOL_MIXED_MEASURED, bfloat16 RTOL_BF16_MEASURED).
POLICY_RTOL = {"mixed": 2e-2, "bfloat16": 5e-2}


@pytest.mark.parametrize("precision", list(POLICY_RTOL))
def test_timm_checkpoint_under_each_policy_matches_the_reference_to_its_rounding(timm_b16, precision):
    sd, _, weights = timm_b16
    params = jax.tree.map(jnp.asarray, unflatten(weights.backbone))
    image = np.random.default_rng(96).standard_normal((2, 96, 96, 3)).astype(np.float32)
    ours = _ours(dataclasses.replace(B16, precision=precision), params, image)
    ref = reference_forward(sd, image.transpose(0, 3, 1, 2), num_heads=12)
    for key in ("cls", "patch_mean"):
        error = np.linalg.norm(ours[key] - ref[key]) / np.linalg.norm(ref[key])
        print(precision, key, error)
        assert error < POLICY_RTOL[precision], (key, error)


def test_b16_export_reproduces_the_timm_file(timm_b16, tmp_path):
    sd, _, weights = timm_b16
    out = tmp_path / "b16.safetensors"
    export_params(unflatten(weights.backbone), None, B16, out, "safetensors")
    exported = st_numpy.load_file(str(out))
    assert set(exported) == set(sd)
    for name, value in sd.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    meta = json.loads((tmp_path / "b16.json").read_text())
    assert meta["timm"]["model_name"] == "vit_base_patch16_224"


# --------------------------------------------------------------------------- (b) our export -> reference

@pytest.mark.parametrize("registers,layerscale", [(0, None), (2, 0.1)])
def test_safetensors_export_matches_numpy_reference(tmp_path, registers, layerscale):
    config = dataclasses.replace(SMALL, num_registers=registers, layerscale_init=layerscale)
    params = _random_model(config)
    out = tmp_path / "small.safetensors"
    export_params(params, None, config, out, "safetensors")
    sd = st_numpy.load_file(str(out))
    assert sd["blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 4, 4)
    image = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ours = _ours(config, params, image)
    ref = reference_forward(sd, image.transpose(0, 3, 1, 2), num_heads=2, num_registers=registers)
    for key in ("cls", "patch_mean"):
        np.testing.assert_allclose(ours[key], ref[key], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- (c) round trips

@pytest.mark.parametrize("fmt", ["msgpack", "safetensors"])
@pytest.mark.parametrize("scan", [False, True])
def test_export_import_round_trip_is_exact(tmp_path, fmt, scan):
    config = dataclasses.replace(SMALL, scan_layers=scan, num_registers=1, layerscale_init=0.5)
    params = _random_model(config)
    head, stats = _random_head(SMALL_HEAD, SMALL.width)
    out = tmp_path / f"teacher.{fmt}"
    export_params(params, head, config, out, fmt, head_batch_stats=stats)
    # Import into the other block layout too: files do not depend on scan_layers.
    for target in (config, dataclasses.replace(config, scan_layers=not scan)):
        weights = load_weights(out, target, SMALL_HEAD, strict=True)
        expected = flatten(unroll_blocks(params))
        assert set(weights.backbone) == set(expected)
        for path, value in expected.items():
            np.testing.assert_array_equal(weights.backbone[path], value, err_msg=str(path))
        for mine, theirs in ((weights.head_params, head), (weights.head_stats, stats)):
            assert set(mine) == set(flatten(theirs))
            for path, value in flatten(theirs).items():
                np.testing.assert_array_equal(mine[path], value)


def test_import_fills_student_and_teacher_of_a_train_state(tmp_path, tiny_config):
    config = tiny_config()
    student, _ = build_networks(config)
    crops = [jnp.zeros((1, 2, config.crops.global_size, config.crops.global_size, 3))]
    variables = jax.jit(lambda: student.init({"params": jax.random.key(0)}, crops, train=False))()
    # Only the networks take part in the import: the optimiser, memory and counters stay None here.
    state = TrainState(**{field.name: None for field in dataclasses.fields(TrainState)}).replace(
        params=variables["params"], teacher_params=variables["params"],
        batch_stats=variables["batch_stats"], teacher_batch_stats=variables["batch_stats"],
    )
    model = backbone_config(config, teacher=True)
    source = _random_model(model, seed=3)
    head, stats = _random_head(HeadConfig(**config.head.to_dict()), model.width, seed=4)
    out = tmp_path / "init.safetensors"
    export_params(source, head, model, out, "safetensors", head_batch_stats=stats)
    config.init_checkpoint = str(out)
    new_state, report = initialize_from_pretrained(state, config)
    assert report.clean, report.summary()
    for tree in (new_state.params, new_state.teacher_params):
        got = flatten(unroll_blocks(to_numpy(tree["backbone"])))
        for path, value in flatten(unroll_blocks(source)).items():
            np.testing.assert_array_equal(got[path], value)
        for path, value in flatten(head).items():
            np.testing.assert_array_equal(flatten(to_numpy(tree["head"]))[path], value)
    for tree in (new_state.batch_stats, new_state.teacher_batch_stats):
        for path, value in flatten(stats).items():
            np.testing.assert_array_equal(flatten(to_numpy(tree["head"]))[path], value)
    assert isinstance(new_state.params["backbone"]["pos_embed"], nn.LogicallyPartitioned)


# --------------------------------------------------------------------------- (d) reports and mismatches

@pytest.fixture
def small_timm_file(tmp_path):
    sd = random_timm_state_dict(np.random.default_rng(5), 64, 2, 128, 4, 8)
    return sd, tmp_path


def test_missing_and_unexpected_keys_are_reported(small_timm_file):
    sd, tmp = small_timm_file
    sd = dict(sd)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["head.weight"] = np.zeros((10, 64), np.float32)  # a timm classifier
    sd["fc_extra.weight"] = np.zeros((3,), np.float32)
    path = tmp / "partial.safetensors"
    st_numpy.save_file(sd, str(path))
    report = load_weights(path, SMALL).report
    assert report.missing == ["blocks.1.mlp.fc2.bias"]
    assert report.unexpected == ["fc_extra.weight", "head.weight"]
    assert "blocks.1.mlp.fc2.bias" in report.summary() and "head.weight" in report.summary()
    with pytest.raises(CheckpointError, match="strict import failed"):
        load_weights(path, SMALL, strict=True)


def test_shape_mismatch_names_the_key_and_both_shapes(small_timm_file):
    sd, tmp = small_timm_file
    sd = dict(sd, **{"blocks.0.mlp.fc1.weight": np.zeros((96, 64), np.float32)})
    path = tmp / "bad.safetensors"
    st_numpy.save_file(sd, str(path))
    with pytest.raises(CheckpointError) as error:
        load_weights(path, SMALL)
    message = str(error.value)
    assert "bad.safetensors" in message and "'blocks.0.mlp.fc1.weight'" in message
    assert "(96, 64)" in message and "(128, 64)" in message


def test_bfloat16_checkpoint_loads_as_float32(small_timm_file):
    sd, tmp = small_timm_file
    path = tmp / "bf16.safetensors"
    st_numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, str(path))
    weights = load_weights(path, SMALL, strict=True)
    cls = weights.backbone[("cls_token",)]
    assert cls.dtype == np.float32
    np.testing.assert_array_equal(cls, sd["cls_token"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_pos_embed_of_another_grid_is_resized_with_a_warning(small_timm_file):
    sd, tmp = small_timm_file  # an 8x8 grid; the model below wants 12x12 (48 px / 4)
    path = tmp / "grid8.safetensors"
    st_numpy.save_file(sd, str(path))
    config = dataclasses.replace(SMALL, img_size=48)
    with pytest.warns(UserWarning, match="resized pos_embed from a 8x8 to a 12x12 grid"):
        weights = load_weights(path, config)
    grid = sd["pos_embed"][0, 1:].reshape(8, 8, 64).astype(np.float64)
    # F.interpolate(size=12) is scale_factor 12/8 with no offset.
    grid = torch_bicubic_1d(grid, 12, 12 / 8)
    grid = np.swapaxes(torch_bicubic_1d(np.swapaxes(grid, 0, 1), 12, 12 / 8), 0, 1)
    np.testing.assert_allclose(weights.backbone[("pos_embed",)][0, 1:], grid.reshape(144, 64), atol=1e-5)
    np.testing.assert_array_equal(weights.backbone[("pos_embed",)][0, 0], sd["pos_embed"][0, 0])


# --------------------------------------------------------------------------- (e) DINO and MerMED layouts

def test_dino_prefixes_are_stripped(small_timm_file):
    sd, tmp = small_timm_file
    path = tmp / "dino.safetensors"
    st_numpy.save_file({f"module.backbone.{k}": v for k, v in sd.items()}, str(path))
    weights = load_weights(path, SMALL, strict=True)
    np.testing.assert_array_equal(weights.backbone[("cls_token",)], sd["cls_token"])


def test_mermed_release_layout_loads_teacher_backbone_and_head(small_timm_file):
    sd, tmp = small_timm_file
    rng = np.random.default_rng(6)
    head = dino_head_state_dict(rng, 64, SMALL_HEAD.hidden_dim, SMALL_HEAD.bottleneck_dim)
    head["head.last_layer.weight_g"] = np.ones((1, 100), np.float32)
    teacher = {f"backbone.{k}": v for k, v in sd.items()} | head
    student = {f"backbone.{k}": v + 1 for k, v in sd.items()}
    path = tmp / "mermed_release.safetensors"  # the nested {'teacher': {...}} dict, flattened with dots
    st_numpy.save_file({f"teacher.{k}": v for k, v in teacher.items()} | {f"student.{k}": v for k, v in student.items()}, str(path))
    weights = load_weights(path, SMALL, SMALL_HEAD)
    report = weights.report
    assert not report.missing and not report.mismatched
    assert report.unexpected == ["head.last_layer.weight_g"]
    assert any("'teacher'" in note and "student" in note for note in report.notes)
    np.testing.assert_array_equal(weights.backbone[("cls_token",)], sd["cls_token"])  # the teacher's, not the student's
    np.testing.assert_array_equal(weights.head_params[("mlp_1", "kernel")], head["head.mlp.3.weight"].T)
    np.testing.assert_array_equal(weights.head_params[("bn_1", "scale")], head["head.mlp.4.weight"])
    np.testing.assert_array_equal(weights.head_stats[("bn_0", "var")], head["head.mlp.1.running_var"])


def test_head_that_does_not_fit_is_reported_and_skipped(small_timm_file):
    sd, tmp = small_timm_file
    head = dino_head_state_dict(np.random.default_rng(7), 64, SMALL_HEAD.hidden_dim, 48)  # bottleneck 48, not 16
    path = tmp / "other_head.safetensors"
    st_numpy.save_file({f"backbone.{k}": v for k, v in sd.items()} | head, str(path))
    weights = load_weights(path, SMALL, SMALL_HEAD)
    assert sorted(m.split(":")[0] for m in weights.report.mismatched) == ["head.mlp.6.bias", "head.mlp.6.weight"]
    assert "(48, 32) in the checkpoint, (16, 32) in the model" in " ".join(weights.report.mismatched)
    assert ("mlp_2", "kernel") not in weights.head_params and ("mlp_1", "kernel") in weights.head_params


# --------------------------------------------------------------------------- (f) hostile files

def test_pickle_as_pth_without_torch_is_refused_unread(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(code_running_pickle(marker))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(CheckpointError, match=r"evil\.pth: .*torch is not installed"):
        load_weights(path, SMALL)
    assert not marker.exists()


def test_pth_export_without_torch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"out\.pth: writing a \.pth needs torch"):
        export_params(_random_model(SMALL), None, SMALL, tmp_path / "out.pth", "pth")
    assert not list(tmp_path.iterdir())


def test_truncated_safetensors_is_refused(small_timm_file):
    sd, tmp = small_timm_file
    path = tmp / "cut.safetensors"
    st_numpy.save_file(sd, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_weights(path, SMALL)


def test_msgpack_with_wrong_shapes_is_refused(tmp_path):
    params = _random_model(SMALL)
    params["blocks_1"]["attn"]["proj"]["kernel"] = np.zeros((2, 32, 32), np.float32)
    path = tmp_path / "wrong.msgpack"
    files.write_msgpack(path, {"backbone": params})
    with pytest.raises(CheckpointError, match=r"wrong\.msgpack: 'blocks_1/attn/proj/kernel' has shape \(2, 32, 32\) .* expects \(2, 32, 64\)"):
        load_weights(path, SMALL)
    scanned = _random_model(dataclasses.replace(SMALL, scan_layers=True))
    scanned["blocks"]["block"]["norm1"]["scale"] = np.ones((3, 64), np.float32)
    files.write_msgpack(tmp_path / "depth.msgpack", {"backbone": scanned})
    with pytest.raises(CheckpointError, match=r"depth\.msgpack: scanned 'blocks/block' leaves must share one"):
        load_weights(tmp_path / "depth.msgpack", SMALL)
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1not msgpack")
    with pytest.raises(CheckpointError, match="junk.msgpack: not a readable msgpack file"):
        load_weights(tmp_path / "junk.msgpack", SMALL)


# --------------------------------------------------------------------------- load_encoder and the CLI

def test_load_encoder_normalises_per_modality(tmp_path):
    params = _random_model(SMALL)
    mean = np.linspace(0.1, 0.7, 3 * NUM_MODALITIES).reshape(NUM_MODALITIES, 3)
    std = np.linspace(0.2, 0.4, 3 * NUM_MODALITIES).reshape(NUM_MODALITIES, 3)
    out = tmp_path / "enc.msgpack"
    export_params(params, None, SMALL, out, "msgpack", pixel_mean=mean, pixel_std=std)
    encoder = load_encoder(out)
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = encoder(images, ["cxr", "derm"])
    pixels = images / 255.0
    normalised = (pixels - mean[[1, 6], None, None, :]) / std[[1, 6], None, None, :]
    want = _ours(SMALL, params, normalised.astype(np.float32))["cls"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(encoder(pixels.astype(np.float32), ["cxr", "derm"]), got, atol=1e-6)
    assert not np.allclose(encoder(images, "ct"), got, atol=1e-3)
    with pytest.raises(ValueError, match="unknown modality 'xray'"):
        encoder(images, "xray")


def test_export_cli_converts_msgpack_to_safetensors(tmp_path):
    params = _random_model(SMALL)
    head, stats = _random_head(SMALL_HEAD, SMALL.width)
    src = tmp_path / "state.msgpack"  # a TrainState-like tree: the teacher is exported
    files.write_msgpack(src, {"teacher_params": {"backbone": params, "head": head},
                              "params": {"backbone": jax.tree.map(np.zeros_like, params)},
                              "teacher_batch_stats": {"head": stats}})
    out = tmp_path / "exported.safetensors"
    cmd = [sys.executable, "-m", "mermed_jax.export", f"--checkpoint={src}", "--format=safetensors", f"--out={out}",
           "--config=configs/demo_cpu.py", "--config.model.img_size=32", "--config.head.hidden_dim=32",
           "--config.head.bottleneck_dim=16", "--with_head"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    weights = load_weights(out, SMALL, SMALL_HEAD, strict=True)
    np.testing.assert_array_equal(weights.backbone[("blocks_1", "mlp", "fc2", "bias")], params["blocks_1"]["mlp"]["fc2"]["bias"])
    np.testing.assert_array_equal(weights.head_stats[("bn_0", "mean")], stats["bn_0"]["mean"])
    meta = json.loads((tmp_path / "exported.json").read_text())
    assert meta["model"]["width"] == 64 and meta["head"]["bottleneck_dim"] == 16
