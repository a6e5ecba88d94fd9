"""Our teacher -> msgpack, safetensors in timm's names, or .pth, each with a config JSON beside it.

The safetensors/.pth files hold exactly timm's VisionTransformer state_dict (num_classes=0), so
`timm.create_model(name, num_classes=0).load_state_dict(safetensors.torch.load_file(f))` works
with no conversion; the JSON names the timm model (or its constructor arguments) and the pixel
normalisation per modality that `load_encoder` applies. An exported head uses DINO's names
(`head.mlp.*`, as in the MerMED release), which timm will report as unexpected: export without
the head for a pure timm encoder. msgpack keeps our own tree, in the layout it was given.
"""

import dataclasses
import json
import os
from typing import Any

import numpy as np

from data_pipelines import normalization, storage
from data_pipelines.modalities import MODALITIES
from mermed_jax.interop import files, timm_names
from mermed_jax.interop.trees import (
    Tree,
    backbone_shapes,
    flatten,
    path_str,
    to_numpy,
    unroll_blocks,
)
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.vit import ViTConfig

FORMATS = {"msgpack": files.MSGPACK, "safetensors": files.SAFETENSORS, "pth": ".pth"}
# What DINO's ImageNet initialisation expects; the default when no per-modality statistics are given.
# ViTConfig fields that describe the function; the rest (precision, remat, drop path, scan) are training choices.
ARCH_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "img_size", "num_registers", "layerscale_init")
_TIMM_NAMES = {
    (192, 12, 3, 768, 16, 224): "vit_tiny_patch16_224",
    (384, 12, 6, 1536, 16, 224): "vit_small_patch16_224",
    (768, 12, 12, 3072, 16, 224): "vit_base_patch16_224",
    (1024, 24, 16, 4096, 16, 224): "vit_large_patch16_224",
}


def config_path(weights_path: str | os.PathLike) -> str:
    """The config JSON beside a weights file (a path or a bucket URL): model.safetensors -> model.json."""
    return os.fspath(storage.path(weights_path).with_suffix(".json"))


def timm_spec(config: ViTConfig) -> dict[str, Any]:
    """How to build the matching timm model: a registered name when one fits, and the kwargs always."""
    key = (config.width, config.depth, config.num_heads, config.mlp_dim, config.patch_size, config.img_size)
    plain = config.num_registers == 0 and config.layerscale_init is None
    kwargs = dict(
        img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.width, depth=config.depth,
        num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.width, qkv_bias=True,
        init_values=config.layerscale_init, reg_tokens=config.num_registers, class_token=True,
        no_embed_class=False, global_pool="token", num_classes=0,
    )
    return {"model_name": _TIMM_NAMES.get(key) if plain else None, "kwargs": kwargs}


def head_config_of(head_params: Tree) -> HeadConfig:
    """The HeadConfig a head's params were built with, read off their shapes."""
    num_layers = sum(1 for name in head_params if name.startswith("mlp_"))
    last = np.shape(head_params[f"mlp_{num_layers - 1}"]["kernel"])
    hidden = np.shape(head_params["mlp_0"]["kernel"])[1] if num_layers > 1 else HeadConfig.hidden_dim
    return HeadConfig(hidden_dim=int(hidden), bottleneck_dim=int(last[1]), num_layers=num_layers, use_bn="bn_0" in head_params)


def _check_backbone(unrolled: Tree, config: ViTConfig) -> None:
    expected, found = backbone_shapes(config), {p: np.shape(v) for p, v in flatten(unrolled).items()}
    if set(expected) != set(found):
        raise ValueError(
            f"backbone params do not match the model config: missing {sorted(map(path_str, set(expected) - set(found)))}, "
            f"unexpected {sorted(map(path_str, set(found) - set(expected)))}"
        )
    for path, shape in expected.items():
        if found[path] != shape:
            raise ValueError(f"backbone param {path_str(path)!r} has shape {found[path]} but the model config implies {shape}")


def timm_state_dict(backbone: Tree, config: ViTConfig) -> dict[str, np.ndarray]:
    """An unrolled backbone as timm's state_dict; register rows of pos_embed are zero (no_embed_class=False)."""
    flat = flatten(backbone)
    tensors = {name: layout.to_torch(flat[path]) for name, (path, layout) in timm_names.backbone_table(backbone_shapes(config)).items()}
    if config.num_registers:
        pos = tensors["pos_embed"]
        zeros = np.zeros((1, config.num_registers, pos.shape[2]), pos.dtype)
        tensors["pos_embed"] = np.concatenate([pos[:, :1], zeros, pos[:, 1:]], axis=1)
    return tensors


def dino_head_state_dict(head_params: Tree, head_stats: Tree | None) -> dict[str, np.ndarray]:
    """The head under DINO's `head.mlp.*` names, with the BatchNorm counters torch expects."""
    cfg = head_config_of(head_params)
    params, stats = flatten(head_params), flatten(head_stats or {})
    table = timm_names.head_table(
        {p: np.shape(v) for p, v in params.items()}, {p: np.shape(v) for p, v in stats.items()},
        timm_names.dino_head_indices(cfg.num_layers, cfg.use_bn),
    )
    source = {"params": params, "batch_stats": stats}
    tensors = {name: layout.to_torch(source[collection][tuple(path)]) for name, ((collection, *path), layout) in table.items()}
    for module, index in timm_names.dino_head_indices(cfg.num_layers, cfg.use_bn).items():
        if module.startswith("bn_") and stats:
            tensors[f"{timm_names.HEAD_PREFIX}{index}.{timm_names.BN_COUNTER}"] = np.zeros((), np.int64)
    return tensors


def _normalization(pixel_mean: np.ndarray | None, pixel_std: np.ndarray | None) -> dict[str, dict[str, list[float]]]:
    mean = np.broadcast_to(np.asarray(normalization.IMAGENET[0] if pixel_mean is None else pixel_mean, np.float64), (len(MODALITIES), 3))
    std = np.broadcast_to(np.asarray(normalization.IMAGENET[1] if pixel_std is None else pixel_std, np.float64), (len(MODALITIES), 3))
    return {m: {"mean": mean[i].tolist(), "std": std[i].tolist()} for i, m in enumerate(MODALITIES)}


def check_output(out_path: str | os.PathLike, fmt: str) -> str:
    """The export's location (a path or a bucket URL), refused before any work when `fmt` is unknown
    or the suffix is not its."""
    out_path = os.fspath(out_path)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {sorted(FORMATS)}")
    if storage.path(out_path).suffix != FORMATS[fmt]:
        raise ValueError(f"{out_path}: a {fmt} export must end in {FORMATS[fmt]}")
    return out_path


def export_params(
    backbone_params: Tree,
    head_params: Tree | None,
    model_config: ViTConfig,
    out_path: str | os.PathLike,
    fmt: str,
    *,
    head_batch_stats: Tree | None = None,
    pixel_mean: np.ndarray | None = None,
    pixel_std: np.ndarray | None = None,
) -> str:
    """Writes the weights to `out_path` (a path or a bucket URL) and their config JSON beside it;
    returns the JSON's location.

    pixel_mean/pixel_std: [NUM_MODALITIES, 3] (or [3]) statistics of [0, 1] pixels, as the train
    step uses them; ImageNet's when omitted.
    """
    out_path = check_output(out_path, fmt)
    backbone = to_numpy(backbone_params)
    unrolled = unroll_blocks(backbone)
    _check_backbone(unrolled, model_config)
    head = to_numpy(head_params) if head_params is not None else None
    stats = to_numpy(head_batch_stats) if head_batch_stats is not None and head is not None else None
    if fmt == "msgpack":
        tree = {"backbone": backbone}
        if head is not None:
            tree["head"] = head
            if stats:
                tree["head_batch_stats"] = stats
        files.write_msgpack(out_path, tree)
    else:
        tensors = timm_state_dict(unrolled, model_config)
        if head is not None:
            tensors.update(dino_head_state_dict(head, stats))
        if fmt == "safetensors":
            files.write_safetensors(out_path, tensors, {"format": "pt"})
        else:
            files.write_torch(out_path, tensors)
    meta = {
        "format": fmt,
        "weights": storage.path(out_path).name,
        "model": {field: getattr(model_config, field) for field in ARCH_FIELDS},
        "scan_layers": fmt == "msgpack" and "blocks" in backbone,
        "head": dataclasses.asdict(head_config_of(head)) if head is not None else None,
        "timm": timm_spec(model_config),
        "normalization": _normalization(pixel_mean, pixel_std),
    }
    json_path = config_path(out_path)
    storage.write_text(json_path, json.dumps(meta, indent=2) + "\n")
    return json_path
