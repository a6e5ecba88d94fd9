"""Patient-data protection end to end, and loaders fed hostile files.

The audit converts every real DICOM sample (../shared/realdata/dicom_samples) with the CLI, pretrains
on the result, evaluates the checkpoint (a linear probe on labelled synthetic data: the DICOM sets
have no labels; the encoder carries their weights and pixel statistics) and exports the teacher; then it
walks every file those steps wrote, and what they printed and logged, for any tag value of the
sources (every text element, file meta included) and any source file name. The hostile files are
pickles that would run code when unpickled, hidden under each weight and data suffix we read.
"""

from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import numpy as np
import pydicom
import pytest
from hostile import RunsCode, code_running_pickle
from repo import ROOT

from data_pipelines import convert as convert_cli
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert
from data_pipelines.sources.medmnist import MedMnistSource
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import evaluate, pretrain
from mermed_jax.eval import encoders
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.weight_export import export_params
from mermed_jax.models.vit import ViTConfig
from mermed_jax.recipe.arguments import load_config_file
from mermed_jax.training import checkpointing

GROUPS = {"ct": ["CT_small.dcm", "693_UNCR.dcm", "ctbrain1.dcm"],
          "us": ["GREYSCALE_IMAGE.dcm", "OBXXXX1A.dcm", "US1_UNCR.dcm"], "cxr": ["RG1_J2KI.dcm"]}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def _text_values(dataset: pydicom.Dataset) -> set[str]:
    """Every text value of a dataset and its sequences, each value of a multi-valued element."""
    found = set()
    for element in dataset.iterall():
        if element.VR in _TEXT_VRS and element.value not in (None, ""):
            values = element.value if isinstance(element.value, pydicom.multival.MultiValue) else [element.value]
            found |= {str(v).strip() for v in values}
    return found


def identifying_strings(path: pathlib.Path) -> set[str]:
    """What must never leave a DICOM file: its tag values and its file name.

    Values shorter than 6 characters, numbers shorter than 8 digits and runs of one or two
    characters are left out: they occur by chance in megabytes of checkpoints and compressed
    pixels (a 4-byte string once every 2^32 bytes), and identify nobody ("CT", "512", "000000").
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = _text_values(ds) | _text_values(ds.file_meta) | {path.stem, path.name}
    return {v for v in values if len(v) >= 6 and len(set(v)) > 2 and not (v.replace(".", "").isdigit() and len(v) < 8)}


def leaks(roots: list[pathlib.Path], texts: list[str], secrets: set[str]) -> list[str]:
    blobs = [(str(p), p.read_bytes()) for root in roots for p in sorted(root.rglob("*")) if p.is_file()]
    blobs += [(f"printed/logged text {i}", t.encode()) for i, t in enumerate(texts)]
    blobs += [(f"file name {p}", str(p.relative_to(root)).encode()) for root in roots for p in root.rglob("*")]
    return [f"{s!r} in {where}" for s in sorted(secrets) for where, blob in blobs if s.encode() in blob]


@pytest.mark.realdata
@pytest.mark.slow
def test_nothing_written_printed_or_logged_holds_a_tag_value_or_source_file_name(realdata, tmp_path, capsys, caplog, tiny_config):
    caplog.set_level(logging.INFO)
    sources, outputs = tmp_path / "sources", tmp_path / "out"
    key_file = tmp_path / "keys" / "id.key"
    key_file.parent.mkdir()
    convert_cli.main(["new-key", str(key_file)])
    secrets: set[str] = set()
    for modality, names in GROUPS.items():
        for name in names:
            (sources / modality).mkdir(parents=True, exist_ok=True)
            shutil.copy(realdata / "dicom_samples" / name, sources / modality / name)
            secrets |= identifying_strings(sources / modality / name)
        code = convert_cli.main([
            "dicom", str(sources / modality), "--modality", modality, "--dataset", f"dicom_{modality}",
            "--out", str(outputs / "data"), "--id-key-file", str(key_file), "--splits", "train=1.0",
            "--workers", "1", "--no-progress", *(["--channels", "3"] if modality == "us" else []),
        ])
        assert code == 0
    dirs = tuple(str(outputs / "data" / f"dicom_{m}") for m in GROUPS)

    config = tiny_config("max_steps=2,log_every_steps=1,checkpoint.every_steps=2,model.depth=1,crops.num_local=2")
    config.data.dirs = dirs
    pretrain.train(config, outputs / "workdir")

    write_demo_data(tmp_path / "labelled", images_per_modality=24, size=32, seed=0, shard_size=64)
    eval_config = load_config_file(ROOT / "configs" / "eval_demo.py", f"root={tmp_path / 'labelled'}")
    eval_config.datasets = {"demo_ct": str(tmp_path / "labelled" / "demo_ct")}  # the DICOM sets have no labels
    eval_config.plots = False
    encoder = encoders.from_checkpoint(outputs / "workdir", None)  # with the run's saved statistics
    evaluate.evaluate(eval_config, [encoder], outputs / "eval")

    state, _, _ = checkpointing.load_train_state(outputs / "workdir")
    mean, std = encoder.pixel_mean, encoder.pixel_std  # the run's saved statistics
    for fmt in ("safetensors", "msgpack"):
        export_params(jax.device_get(state.teacher_params["backbone"]), jax.device_get(state.teacher_params["head"]),
                      encoder.config, outputs / "export" / f"teacher.{fmt}", fmt, pixel_mean=mean, pixel_std=std)

    printed = capsys.readouterr()
    texts = [printed.out, printed.err, caplog.text]
    assert len(secrets) > 50 and {"693_UNCR.dcm", "RG1_J2KI"} <= secrets
    assert leaks([outputs], texts, secrets) == []
    (outputs / "eval" / "planted.txt").write_text(f"control: {sorted(secrets)[7]}")  # the walk does find one
    assert len(leaks([outputs], texts, secrets)) == 1


# --------------------------------------------------------------------------- hostile files

@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".msgpack"])
def test_a_pickle_that_would_run_code_is_refused_as_weights(tmp_path, suffix):
    """With torch installed, torch.load(weights_only=True) refuses it; without, it is never opened."""
    marker = tmp_path / "code_ran"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(code_running_pickle(marker))
    with pytest.raises(CheckpointError, match=rf"evil\{suffix}: "):
        load_weights(path, ViTConfig(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, img_size=8))
    assert not marker.exists()


def test_a_pickle_in_a_medmnist_npz_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "pathmnist.npz"
    np.savez(path, train_images=np.array([RunsCode(marker)], dtype=object), train_labels=np.zeros((1, 1)))
    with pytest.raises((ConversionError, ValueError), match="allow_pickle"):
        convert(MedMnistSource(path), b"k" * 32, ConvertOptions(dataset="m", out_dir=tmp_path / "out", progress=False))
    assert not marker.exists()
