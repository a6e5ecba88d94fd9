"""Our exports in timm, and timm checkpoints in our ViT, checked against PyTorch itself.

Needs torch and timm (`make test-interop` builds .venv-interop with them); skipped otherwise.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from hostile import RunsCode  # noqa: E402
from repo import ROOT  # noqa: E402
from safetensors import torch as st_torch  # noqa: E402
from test_export_workdir import write_tiny_run  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from data_pipelines import normalization  # noqa: E402
from data_pipelines.modalities import MODALITIES  # noqa: E402
from mermed_jax.eval.encoders import eval_vit_config  # noqa: E402
from mermed_jax.interop.files import CheckpointError  # noqa: E402
from mermed_jax.interop.importer import load_weights  # noqa: E402
from mermed_jax.interop.trees import backbone_shapes, unflatten  # noqa: E402
from mermed_jax.interop.weight_export import export_params  # noqa: E402
from mermed_jax.models.vit import ViT, ViTConfig  # noqa: E402
from mermed_jax.training import checkpointing  # noqa: E402

pytestmark = pytest.mark.interop

B16 = ViTConfig.from_variant("B/16", precision="float32")
SMALL = ViTConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4, img_size=32, precision="float32",
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


def test_workdir_export_cli_loads_into_timm_with_equal_embeddings(tmp_path, tiny_config):
    """`python -m mermed_jax.export --workdir=` on a run with registers and LayerScale, loaded as
    `make demo` prints: the model from the JSON's timm spec, the weights strictly from the file."""
    config = tiny_config("model.num_registers=2,model.layerscale_init=0.1,pixel_stats.source='official'")
    workdir = tmp_path / "run"
    write_tiny_run(workdir, (str(tmp_path / "data_not_needed"),), config)
    out = tmp_path / "export" / "teacher.safetensors"
    cmd = [sys.executable, "-m", "mermed_jax.export", f"--workdir={workdir}", "--format=safetensors", f"--out={out}"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]

    meta = json.loads(out.with_suffix(".json").read_text())
    spec = meta["timm"]
    model = timm.create_model(spec["model_name"], num_classes=0) if spec["model_name"] else VisionTransformer(**spec["kwargs"])
    model.load_state_dict(st_torch.load_file(str(out)), strict=True)
    mean, std = normalization.table("official")
    np.testing.assert_allclose([meta["normalization"][m]["mean"] for m in MODALITIES], mean, rtol=1e-6)
    np.testing.assert_allclose([meta["normalization"][m]["std"] for m in MODALITIES], std, rtol=1e-6)
    state, saved_config, _ = checkpointing.load_train_state(workdir)
    vit = eval_vit_config(saved_config)
    image = np.random.default_rng(5).standard_normal((2, vit.img_size, vit.img_size, 3)).astype(np.float32)
    _assert_close(_ours(vit, jax.device_get(state.teacher_params["backbone"]), image), _timm(model, image))


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
