r"""Export a teacher's weights: msgpack, safetensors in timm's names, or .pth, with a config JSON.

  python -m mermed_jax.export --workdir=workdirs/demo --format=safetensors --out=teacher.safetensors
  python -m mermed_jax.export --workdir=runs/b16 --step=40000 --format=msgpack --out=b16.msgpack --with_head
  python -m mermed_jax.export --checkpoint=teacher.msgpack --format=safetensors --out=mermed_b16.safetensors
  python -m mermed_jax.export --checkpoint=dino.pth --config=configs/mermed_vitb16.py --format=msgpack --out=dino.msgpack

--workdir: a pretraining workdir; its checkpoint at --step (a number, or `latest`, the default) is
read for the teacher alone (checkpointing.load_teacher: a partial restore that leaves the student,
the optimiser and the memory on disk, so exporting a ViT-B/16 run needs about the teacher's memory,
not the whole state's), checked against the digest saved with it. The architecture is the run's
(config.json) and the JSON records the run's per-modality pixel statistics (run.json, or for a run
from before run records the statistics of its data.dirs), so the export normalises its inputs as
the training did without the training data.

--checkpoint: a msgpack params tree (our export, a bare backbone, or a serialised TrainState, whose
teacher is taken) or a PyTorch .safetensors/.pth (timm, DINO, MerMED release). The architecture
comes from --config (an ml_collections config file, `--config.model.key=value` overrides work) or,
without it, from the config JSON beside the checkpoint. Everything passes through the importer, so
a file that does not fit the config is refused before anything is written.

Exactly one of --workdir and --checkpoint. --with_head also exports the projection head (and its
BatchNorm statistics). Every location may be local or a bucket URL: --out and --checkpoint gs:// or
s3://, --workdir gs:// (pretraining workdirs cannot be on s3://).
"""
import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import storage
from data_pipelines.modalities import MODALITIES
from mermed_jax.eval import encoders
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import unflatten
from mermed_jax.interop.weight_export import (
    ARCH_FIELDS,
    FORMATS,
    check_output,
    config_path,
    export_params,
)
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.networks import backbone_config
from mermed_jax.models.vit import ViTConfig
from mermed_jax.training import checkpointing


def _configs_from_json(checkpoint: str) -> tuple[ViTConfig, HeadConfig | None, dict | None]:
    meta_path = config_path(checkpoint)
    if not storage.exists(meta_path):
        raise CheckpointError(f"{checkpoint}: no --config given and no config JSON beside it ({meta_path})")
    meta = json.loads(storage.read_text(meta_path))
    model = ViTConfig(**{field: meta["model"][field] for field in ARCH_FIELDS}, precision="float32")
    head = HeadConfig(**meta["head"]) if meta.get("head") else None
    return model, head, meta.get("normalization")


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str,
    config: ml_collections.ConfigDict | None = None, with_head: bool = False,
) -> str:
    """Import `checkpoint` for the architecture of `config` (or its JSON) and export it; returns the JSON path."""
    checkpoint = os.fspath(checkpoint)
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


def export_workdir(
    workdir: str | os.PathLike, out: str | os.PathLike, fmt: str, step: int | None = None, with_head: bool = False,
) -> tuple[str, int]:
    """Export the teacher of a pretraining checkpoint (step None: the latest), read alone, with the
    run's architecture and pixel statistics; returns the JSON path and the step exported."""
    check_output(out, fmt)  # before the checkpoint is read
    teacher, config, step = checkpointing.load_teacher(workdir, step, with_head)
    pixel_mean, pixel_std = encoders.pixel_statistics(workdir, config, "pretrain")
    teacher = jax.device_get(teacher)
    json_path = export_params(
        teacher["teacher_params"]["backbone"], teacher["teacher_params"]["head"] if with_head else None,
        encoders.eval_vit_config(config), out, fmt,
        head_batch_stats=teacher["teacher_batch_stats"].get("head") if with_head else None,
        pixel_mean=pixel_mean, pixel_std=pixel_std,
    )
    return json_path, step


def parse_step(text: str) -> int | None:
    """--step: a checkpoint step, or 'latest' (None)."""
    if text == "latest":
        return None
    if not text.isdigit():
        raise app.UsageError(f"--step={text}: expected a checkpoint step (a number) or 'latest'")
    return int(text)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if (f.workdir is None) == (f.checkpoint is None):
        raise app.UsageError("give exactly one of --workdir (a pretraining run) and --checkpoint (a weights file)")
    # A missing bucket or permission, before anything is read; the probe goes beside the output.
    storage.check_bucket(storage.path(f.out).parent, writable=True)
    if f.workdir is not None:
        if f.config is not None:
            raise app.UsageError("--config is for --checkpoint; a --workdir export takes the run's own config.json")
        json_path, step = export_workdir(f.workdir, f.out, f.format, parse_step(f.step), f.with_head)
        print(f"wrote {f.out} and {json_path}: the teacher of {f.workdir} at step {step}")
        return
    if f.step != "latest":
        raise app.UsageError("--step is for --workdir; --checkpoint is one file")
    json_path = export_checkpoint(f.checkpoint, f.out, f.format, f.config, f.with_head)
    print(f"wrote {f.out} and {json_path}")


def run() -> None:
    """The command line: flags are defined here, not at import, so the CLIs can be imported together (tests)."""
    flags.DEFINE_string("workdir", None, "Pretraining workdir whose checkpoint's teacher is exported.")
    flags.DEFINE_string("step", "latest", "With --workdir: the checkpoint step, or 'latest'.")
    flags.DEFINE_string("checkpoint", None, "Weights file to export (.msgpack, .safetensors, .pth).")
    flags.DEFINE_enum("format", "safetensors", sorted(FORMATS), "Output format.")
    flags.DEFINE_string("out", None, "Output weights file; its config JSON is written beside it.", required=True)
    flags.DEFINE_bool("with_head", False, "Also export the projection head (DINO names in safetensors/pth).")
    config_flags.DEFINE_config_file("config", None, "With --checkpoint: the pretraining config that defines the architecture.")
    app.run(main)


if __name__ == "__main__":
    run()
