"""Our exports in timm, and timm checkpoints in our ViT, checked against PyTorch itself.

Needs torch and timm (`make test-interop` builds .venv-interop with them); skipped otherwise.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from hostile import RunsCode  # noqa: E402
from safetensors import torch as st_torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from mermed_jax.interop.files import CheckpointError  # noqa: E402
from mermed_jax.interop.importer import load_weights  # noqa: E402
from mermed_jax.interop.trees import backbone_shapes, unflatten  # noqa: E402
from mermed_jax.interop.weight_export import export_params  # noqa: E402
from mermed_jax.models.vit import ViT, ViTConfig  # noqa: E402

pytestmark = pytest.mark.interop

B16 = ViTConfig.from_variant("B/16", dtype="float32")
SMALL = ViTConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4, img_size=32, dtype="float32",
                  num_registers=2, layerscale_init=0.1)


def _random_backbone(config: ViTConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in backbone_shapes(config).items():
        noise = (rng.standard_normal(shape) * (0.5 if path[0] in ("pos_embed", "cls_token", "reg_token") else 0.03))
        out[path] = (1 + noise if path[-1] == "scale" else noise).astype(np.float32)
    return unflatten(out)


def _ours(config: ViTConfig, params: dict, images_nhwc: np.ndarray) -> dict:
    out = jax.jit(lambda p, x: ViT(config).apply({"params": p}, x, train=False))(params, jnp.asarray(images_nhwc))
    return {k: np.asarray(v) for k, v in out.items()}


def _timm(model, images_nhwc: np.ndarray) -> dict:
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))
        pooled = model.forward_head(tokens)
    return {"cls": pooled.numpy(), "patch_mean": tokens[:, model.num_prefix_tokens:].mean(1).numpy()}


def _assert_close(ours: dict, theirs: dict) -> None:
    for key in ("cls", "patch_mean"):
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-4, rtol=0, err_msg=key)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_export_loads_into_timm_vit_b16_with_equal_embeddings(tmp_path, fmt):
    params = _random_backbone(B16, seed=0)
    out = tmp_path / f"mermed_b16.{fmt}"
    export_params(params, None, B16, out, fmt)
    meta = json.loads(out.with_suffix(".json").read_text())
    model = timm.create_model(meta["timm"]["model_name"], pretrained=False, num_classes=0)
    state = st_torch.load_file(str(out)) if fmt == "safetensors" else torch.load(str(out), weights_only=True)
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    image = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    _assert_close(_ours(B16, params, image), _timm(model, image))


def test_export_with_registers_and_layerscale_builds_from_the_json_kwargs(tmp_path):
    params = _random_backbone(SMALL, seed=2)
    out = tmp_path / "small.safetensors"
    export_params(params, None, SMALL, out, "safetensors")
    kwargs = json.loads(out.with_suffix(".json").read_text())["timm"]["kwargs"]
    model = VisionTransformer(**kwargs)
    model.load_state_dict(st_torch.load_file(str(out)), strict=True)
    image = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    _assert_close(_ours(SMALL, params, image), _timm(model, image))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_imports_and_matches_timm(tmp_path, fmt):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad():  # timm's init leaves cls_token ~1e-6 and biases at 0: make every tensor count
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    path = tmp_path / f"timm_b16.{fmt}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    st_torch.save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, str(path))
    weights = load_weights(path, B16, strict=True)
    image = np.random.default_rng(4).standard_normal((1, 224, 224, 3)).astype(np.float32)
    _assert_close(_ours(B16, unflatten(weights.backbone), image), _timm(model, image))


def test_timm_classifier_is_reported_as_unexpected(tmp_path):
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10)
    path = tmp_path / "classifier.pth"
    torch.save(model.state_dict(), str(path))
    config = dataclasses.replace(SMALL, num_registers=0, layerscale_init=None)
    weights = load_weights(path, config)
    assert weights.report.unexpected == ["head.bias", "head.weight"] and not weights.report.missing
    assert set(weights.backbone) == set(backbone_shapes(config))


def test_pickle_with_code_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": RunsCode(marker)}, str(path))
    with pytest.raises(CheckpointError, match=r"evil\.pth: torch.load\(weights_only=True\) refused the file"):
        load_weights(path, SMALL)
    assert not marker.exists()
