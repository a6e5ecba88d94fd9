r"""Export a teacher's weights: msgpack, safetensors in timm's names, or .pth, with a config JSON.

  python -m mermed_jax.export --checkpoint=teacher.msgpack --format=safetensors --out=mermed_b16.safetensors
  python -m mermed_jax.export --checkpoint=dino.pth --config=configs/mermed_vitb16.py --format=msgpack --out=dino.msgpack

--checkpoint: a msgpack params tree (our export, a bare backbone, or a serialised TrainState, whose
teacher is taken) or a PyTorch .safetensors/.pth (timm, DINO, MerMED release). The architecture
comes from --config (an ml_collections config file, `--config.model.key=value` overrides work) or,
without it, from the config JSON beside the checkpoint. --with_head also exports the projection
head. Everything passes through the importer, so a file that does not fit the config is refused
before anything is written.
"""

import json
import os
import pathlib

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.modalities import MODALITIES
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import unflatten
from mermed_jax.interop.weight_export import (
    ARCH_FIELDS,
    FORMATS,
    config_path,
    export_params,
)
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.networks import backbone_config
from mermed_jax.models.vit import ViTConfig


def _configs_from_json(checkpoint: pathlib.Path) -> tuple[ViTConfig, HeadConfig | None, dict | None]:
    meta_path = config_path(checkpoint)
    if not meta_path.is_file():
        raise CheckpointError(f"{checkpoint}: no --config given and no config JSON beside it ({meta_path})")
    meta = json.loads(meta_path.read_text())
    model = ViTConfig(**{field: meta["model"][field] for field in ARCH_FIELDS}, dtype="float32")
    head = HeadConfig(**meta["head"]) if meta.get("head") else None
    return model, head, meta.get("normalization")


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str,
    config: ml_collections.ConfigDict | None = None, with_head: bool = False,
) -> pathlib.Path:
    """Import `checkpoint` for the architecture of `config` (or its JSON) and export it; returns the JSON path."""
    checkpoint = pathlib.Path(checkpoint)
    normalization = None
    if config is not None:
        model_config, head_config = backbone_config(config, teacher=True), HeadConfig(**config.head.to_dict())
    else:
        model_config, head_config, normalization = _configs_from_json(checkpoint)
    if with_head and head_config is None:
        raise CheckpointError(f"{checkpoint}: --with_head, but no head architecture is known (give --config)")
    weights = load_weights(checkpoint, model_config, head_config if with_head else None)
    head_incomplete = with_head and (not weights.head_params or any(n.startswith("head") for n in weights.report.missing))
    if any(not n.startswith("head") for n in weights.report.missing) or head_incomplete or weights.report.mismatched:
        raise CheckpointError(f"{checkpoint}: refusing to export incomplete weights\n{weights.report.summary()}")
    stats = {}
    if normalization:
        stats = {key: np.array([normalization[m][key] for m in MODALITIES]) for key in ("mean", "std")}
    return export_params(
        unflatten(weights.backbone), unflatten(weights.head_params) if with_head else None, model_config, out, fmt,
        head_batch_stats=unflatten(weights.head_stats) if with_head and weights.head_stats else None,
        pixel_mean=stats.get("mean"), pixel_std=stats.get("std"),
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    json_path = export_checkpoint(flags.FLAGS.checkpoint, flags.FLAGS.out, flags.FLAGS.format, flags.FLAGS.config, flags.FLAGS.with_head)
    print(f"wrote {flags.FLAGS.out} and {json_path}")


def run() -> None:
    """The command line: flags are defined here, not at import, so the CLIs can be imported together (tests)."""
    flags.DEFINE_string("checkpoint", None, "Weights to export (.msgpack, .safetensors, .pth).", required=True)
    flags.DEFINE_enum("format", "safetensors", sorted(FORMATS), "Output format.")
    flags.DEFINE_string("out", None, "Output weights file; its config JSON is written beside it.", required=True)
    flags.DEFINE_bool("with_head", False, "Also export the projection head (DINO names in safetensors/pth).")
    config_flags.DEFINE_config_file("config", None, "Pretraining config that defines the architecture.")
    app.run(main)


if __name__ == "__main__":
    run()
