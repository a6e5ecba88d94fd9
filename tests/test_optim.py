"""AdamW with per-tensor clipping, layer decay and scheduled decoupled weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from repo import ROOT

from mermed_jax.models.networks import abstract_params
from mermed_jax.recipe.arguments import load_config_file
from mermed_jax.ssl.ema import ema_update
from mermed_jax.training.optim import (
    clip_per_tensor,
    layer_decay_multipliers,
    make_optimizer,
    weight_decay_mask,
)


def _flat(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def vitb_params():
    return abstract_params(load_config_file(ROOT / "configs" / "mermed_vitb16.py"))


def test_vitb_layer_decay_multipliers(vitb_params):
    mult = _flat(layer_decay_multipliers(vitb_params, depth=12, decay=0.8))
    for name in ("backbone/patch_embed/kernel", "backbone/pos_embed", "backbone/cls_token"):
        assert mult[name] == pytest.approx(0.8**14)
    for k in range(12):
        assert mult[f"backbone/blocks_{k}/attn/qkv/kernel"] == pytest.approx(0.8 ** (13 - k))
        assert mult[f"backbone/blocks_{k}/norm2/scale"] == pytest.approx(0.8 ** (13 - k))
    assert mult["backbone/norm/scale"] == pytest.approx(0.8)
    assert mult["head/mlp_0/kernel"] == 1.0 and mult["head/bn_1/scale"] == 1.0


def test_scanned_layers_get_one_multiplier_per_layer():
    config = load_config_file(ROOT / "configs" / "mermed_vitb16.py", "model.scan_layers=True")
    mult = _flat(layer_decay_multipliers(abstract_params(config), depth=12, decay=0.8))
    qkv = mult["backbone/blocks/block/attn/qkv/kernel"]
    assert qkv.shape == (12, 1, 1, 1, 1)
    np.testing.assert_allclose(qkv.reshape(-1), 0.8 ** (13 - np.arange(12)), rtol=1e-6)


def test_weight_decay_skips_biases_norms_position_embedding_and_cls(vitb_params):
    mask = _flat(weight_decay_mask(vitb_params))
    decayed = {k for k, v in mask.items() if v == 1.0}
    assert "backbone/blocks_3/mlp/fc1/kernel" in decayed and "head/mlp_2/kernel" in decayed
    for name in ("backbone/pos_embed", "backbone/cls_token", "backbone/blocks_3/mlp/fc1/bias",
                 "backbone/blocks_3/norm1/scale", "backbone/norm/bias", "head/bn_0/scale"):
        assert mask[name] == 0.0, name
    assert all(k.endswith("kernel") for k in decayed)


def test_clipping_is_per_tensor_not_global():
    grads = {"backbone": {"a": jnp.full((4,), 3.0), "b": jnp.full((2,), 0.1)}}
    clipped, _ = clip_per_tensor(1.0, grads).update(grads, None)
    a, b = np.asarray(clipped["backbone"]["a"]), np.asarray(clipped["backbone"]["b"])
    assert np.linalg.norm(a) == pytest.approx(1.0 / (1 + 1e-6 / 6.0), rel=1e-6)  # 6 / (6 + 1e-6)
    np.testing.assert_allclose(b, 0.1)  # small tensors are untouched


def test_scanned_tensors_are_clipped_per_layer():
    g = jnp.stack([jnp.full((3,), 10.0), jnp.full((3,), 0.01)])
    clipped, _ = clip_per_tensor(1.0, {"backbone": {"blocks": {"w": g}}}).update({"backbone": {"blocks": {"w": g}}}, None)
    w = np.asarray(clipped["backbone"]["blocks"]["w"])
    assert np.linalg.norm(w[0]) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(w[1], 0.01)


def test_adamw_update_matches_pytorch_param_group_semantics():
    """Reference: torch AdamW with a param group of lr * scale and per-step weight decay."""
    params = {"backbone": {"norm": {"scale": jnp.asarray([1.0, -2.0])}, "blocks_0": {"k": {"kernel": jnp.asarray([[0.5, 1.5]])}}},
              "head": {"mlp_0": {"kernel": jnp.asarray([[2.0, 0.0]])}}}
    opt = make_optimizer(dict(clip_grad=1.0, b1=0.9, b2=0.999, eps=1e-8, layer_decay=0.5), params, depth=1)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    ref = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    scale = {"backbone/norm/scale": 0.5, "backbone/blocks_0/k/kernel": 0.25, "head/mlp_0/kernel": 1.0}
    decay = {"backbone/norm/scale": 0.0, "backbone/blocks_0/k/kernel": 1.0, "head/mlp_0/kernel": 1.0}
    m = {k: 0.0 for k in ref}
    v = {k: 0.0 for k in ref}
    for t, (lr, wd) in enumerate([(0.1, 0.04), (0.05, 0.3)], start=1):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 2, jnp.float32), params)
        updates, state = opt.update(grads, state, params, learning_rate=lr, weight_decay=wd)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k, g in _flat(grads).items():
            g = np.asarray(g, np.float64)
            g = g * min(1.0, 1.0 / (np.linalg.norm(g) + 1e-6))
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            adam = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
            group_lr = lr * scale[k]
            ref[k] = ref[k] * (1 - group_lr * wd * decay[k]) - group_lr * adam
        for k, p in _flat(params).items():
            np.testing.assert_allclose(np.asarray(p), ref[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_ema_update_matches_reference():
    teacher = {"w": jnp.asarray([1.0, 2.0]), "bn": {"scale": jnp.asarray([0.5])}}
    student = {"w": jnp.asarray([3.0, -2.0]), "bn": {"scale": jnp.asarray([1.5])}}
    new = ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(np.asarray(new["w"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["bn"]["scale"]), [0.6], rtol=1e-6)
    same = ema_update(teacher, student, 1.0)
    np.testing.assert_array_equal(np.asarray(same["w"]), np.asarray(teacher["w"]))
