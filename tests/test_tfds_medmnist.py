"""The MedMNIST TFDS builder emits the converter's Example schema, readable without TensorFlow."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import (
    records,  # noqa: E402
    tfds_medmnist,  # noqa: E402,F401  (registers the builder)
)
from data_pipelines.manifest import load_manifest  # noqa: E402
from data_pipelines.privacy import KEY_ENV, image_id  # noqa: E402
from data_pipelines.shard_writer import ConvertOptions, convert  # noqa: E402
from data_pipelines.sources.medmnist import MedMnistSource  # noqa: E402

KEY = bytes(range(32))


def _npz(directory, name, channels, multi_label):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 5)):
        shape = (n, 28, 28) if channels == 1 else (n, 28, 28, 3)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14)) if multi_label else rng.integers(0, 2, (n, 1))
    np.savez(directory / name, **arrays)
    return arrays


def _build(tmp_path, config, fmt):
    builder = tfds.builder(f"med_mnist/{config}", data_dir=tmp_path / fmt, file_format=fmt)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "manual"))
    return builder


@pytest.mark.parametrize("flag, channels, multi_label", [("breastmnist", 1, False), ("chestmnist", 1, True)])
def test_tfds_examples_equal_the_converters(tmp_path, monkeypatch, flag, channels, multi_label):
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    (tmp_path / "manual").mkdir()
    arrays = _npz(tmp_path / "manual", f"{flag}.npz", channels, multi_label)
    builder = _build(tmp_path, f"{flag}_28", "tfrecord")
    tfds_manifest = load_manifest(builder.data_dir)
    converted = convert(MedMnistSource(tmp_path / "manual" / f"{flag}.npz"), KEY,
                        ConvertOptions(flag, tmp_path / "conv", progress=False)).manifest
    assert tfds_manifest.modality == converted.modality and tfds_manifest.label_names == converted.label_names
    assert tfds_manifest.multi_label == multi_label and tfds_manifest.format == "tfrecord"
    for split in ("train", "val", "test"):
        assert tfds_manifest.splits[split].class_counts == converted.splits[split].class_counts
        np.testing.assert_allclose(tfds_manifest.splits[split].mean, converted.splits[split].mean, atol=1e-12)
        np.testing.assert_allclose(tfds_manifest.splits[split].std, converted.splits[split].std, atol=1e-12)
        ids = {image_id(KEY, f"{flag}.npz/{split}/{i}"): i for i in range(len(arrays[f"{split}_images"]))}
        seen = set()
        for path in tfds_manifest.shard_paths(split):
            for _, payload in records.iter_records(path):
                ex = records.decode_example(payload)
                i = ids[ex["image_id"]]
                seen.add(i)
                np.testing.assert_array_equal(records.decode_image(ex["image"], channels=1)[:, :, 0],
                                              arrays[f"{split}_images"][i])
                row = arrays[f"{split}_labels"][i]
                assert list(ex["labels"]) == (list(np.flatnonzero(row == 1)) if multi_label else [row[0]])
                assert ex["modality"] == converted.modality and ex["height"] == 28
        assert seen == set(ids.values())


def test_array_record_build_serves_tfds_data_source_and_our_readers_refuse_it(tmp_path):
    """TFDS users may prepare the builder as ArrayRecord for tfds.data_source; this package's
    readers read TFRecord only, so load_manifest refuses the directory rather than list its files."""
    (tmp_path / "manual").mkdir()
    arrays = _npz(tmp_path / "manual", "retinamnist.npz", 3, False)
    builder = _build(tmp_path, "retinamnist_28", "array_record")
    source = tfds.data_source("med_mnist/retinamnist_28", data_dir=tmp_path / "array_record")
    assert [len(source[s]) for s in ("train", "val", "test")] == [12, 4, 5]
    train = {tuple(source["train"][i]["image"].ravel()[:64]) for i in range(12)}
    assert train == {tuple(img.ravel()[:64]) for img in arrays["train_images"]}
    with pytest.raises(ValueError, match="'array_record'.*file_format='tfrecord'"):
        load_manifest(builder.data_dir)
