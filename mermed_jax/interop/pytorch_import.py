"""A PyTorch ViT state_dict (timm, DINO, the MerMED release) -> our backbone and head arrays.

Accepted layouts, after flattening nested dicts to dotted names:
  timm:     patch_embed.proj.weight, blocks.0.attn.qkv.weight, ..., optional head.weight (a
            classifier we have no use for: reported as unexpected);
  DINO:     the same names, perhaps under `module.` (DDP) and/or `backbone.`, with the DINO head
            under `head.mlp.*` and its prototype layer under `head.last_layer.*`;
  MerMED:   {'teacher': {'backbone.*', 'head.*'}}; when a file holds several networks
            ('teacher', 'student', ...) the teacher is taken, as the release evaluates it.
A backbone tensor whose shape does not fit is an error naming the tensor and both shapes: it
means the wrong model config, and loading around it would train a different network silently.
A head tensor that does not fit (another bottleneck or hidden size) is reported and keeps its
initialisation, because the head is only a starting point for pretraining.
"""

from collections.abc import Mapping

import numpy as np

from mermed_jax.interop import timm_names
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.import_report import ImportedWeights, ImportReport
from mermed_jax.interop.pos_fit import fit_pos_embed
from mermed_jax.interop.trees import backbone_shapes, head_shapes
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.vit import ViTConfig

# Wrappers around a state_dict, in order of preference: the teacher is the network MerMED evaluates.
_WRAPPERS = ("teacher", "state_dict", "model")
_DDP_PREFIX = "module."
_BACKBONE_PREFIX = "backbone."


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def split_state_dict(
    state_dict: Mapping[str, np.ndarray], report: ImportReport
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(backbone tensors in timm names, head tensors in DINO names); the rest goes to `unexpected`."""
    tensors = dict(state_dict)
    for wrapper in _WRAPPERS:
        prefix = wrapper + "."
        if any(name.startswith(prefix) for name in tensors):
            others = sorted({name.split(".", 1)[0] for name in tensors if not name.startswith(prefix)})
            if others:
                report.notes.append(f"took the {wrapper!r} weights; ignored {others}")
            tensors = {name[len(prefix):]: v for name, v in tensors.items() if name.startswith(prefix)}
            break
    tensors = {_strip(name, _DDP_PREFIX): v for name, v in tensors.items()}
    prefixed = any(name.startswith(_BACKBONE_PREFIX) for name in tensors)
    backbone, head = {}, {}
    for name, value in tensors.items():
        if name.startswith(timm_names.HEAD_PREFIX) or name.startswith(timm_names.DINO_LAST_LAYER_PREFIX):
            head[name] = value
        elif prefixed and name.startswith(_BACKBONE_PREFIX):
            backbone[name[len(_BACKBONE_PREFIX):]] = value
        elif prefixed:
            report.unexpected.append(name)
        else:
            backbone[name] = value
    return backbone, head


def _import_backbone(tensors: dict[str, np.ndarray], config: ViTConfig, report: ImportReport) -> dict:
    shapes = backbone_shapes(config)
    fit_pos_embed(tensors, shapes[("pos_embed",)], config.num_registers, report.source, report.notes)
    table = timm_names.backbone_table(shapes)
    out = {}
    for name, (path, layout) in table.items():
        if name not in tensors:
            report.missing.append(name)
            continue
        found = tuple(np.shape(tensors[name]))
        if found != layout.torch_shape:
            raise CheckpointError(
                f"{report.source}: {name!r} has shape {found} in the checkpoint but the model expects "
                f"{layout.torch_shape} (our {'/'.join(path)} {layout.ours}); check the model config"
            )
        out[path] = layout.from_torch(np.asarray(tensors[name], np.float32))
        report.loaded.append(name)
    report.unexpected.extend(sorted(set(tensors) - set(table)))
    if not out:
        raise CheckpointError(f"{report.source}: no ViT weights found; first names in the file: {sorted(tensors)[:8]}")
    return out


def _import_head(
    tensors: dict[str, np.ndarray], config: HeadConfig, width: int, report: ImportReport
) -> tuple[dict, dict]:
    param_shapes, stat_shapes = head_shapes(config, width)
    table = timm_names.head_table(param_shapes, stat_shapes, timm_names.detect_dino_head_indices(tensors))
    params, stats = {}, {}
    for name, ((collection, *path), layout) in table.items():
        if name not in tensors:
            continue
        found = tuple(np.shape(tensors[name]))
        if found != layout.torch_shape:
            report.mismatched.append(f"{name}: {found} in the checkpoint, {layout.torch_shape} in the model")
            continue
        (params if collection == "params" else stats)[tuple(path)] = layout.from_torch(np.asarray(tensors[name], np.float32))
        report.loaded.append(name)
    names = {key: name for name, (key, _) in table.items()}
    done = {("params", *p) for p in params} | {("batch_stats", *p) for p in stats}
    for collection, shapes in (("params", param_shapes), ("batch_stats", stat_shapes)):
        for path in shapes:
            key = (collection, *path)
            if key not in done and not (key in names and names[key] in tensors):
                report.missing.append(names.get(key, f"head/{collection}/{'/'.join(path)}"))
    counters = {name for name in tensors if name.endswith("." + timm_names.BN_COUNTER)}
    report.unexpected.extend(sorted(set(tensors) - set(table) - counters))
    if any(name.startswith(timm_names.DINO_LAST_LAYER_PREFIX) for name in tensors):
        report.notes.append("head.last_layer is DINO's prototype layer; MaSSL's head has none")
    return params, stats


def import_state_dict(
    state_dict: Mapping[str, np.ndarray], config: ViTConfig, head_config: HeadConfig | None, source: str
) -> ImportedWeights:
    """Our backbone (and head, when `head_config` is given and the file has one) from a state_dict."""
    report = ImportReport(source)
    backbone_tensors, head_tensors = split_state_dict(state_dict, report)
    backbone = _import_backbone(backbone_tensors, config, report)
    head_params, head_stats = {}, {}
    if head_config is not None and head_tensors:
        head_params, head_stats = _import_head(head_tensors, head_config, config.width, report)
    elif head_config is not None:
        report.notes.append("the file has no projection head; ours keeps its initialisation")
    else:
        report.unexpected.extend(sorted(head_tensors))
    return ImportedWeights(backbone, head_params, head_stats, report)
