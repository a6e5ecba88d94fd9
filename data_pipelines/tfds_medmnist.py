"""TFDS builders for the MedMNIST 2D family, emitting the shard Example schema of records.py.

One builder, `med_mnist`, with a config per flag and size (e.g. "pathmnist_28", "chestmnist_64").
The npz files are a manual download: put them in manual_dir under their official names
(pathmnist.npz for 28 px, pathmnist_64.npz for 64 px, ...). The features are flat and named like
the converter's Example fields, so TFDS writes Examples a reader of converted shards understands;
the builder's metadata (metadata.json) carries modality, label names and pixel statistics, which
`manifest.load_manifest` turns into a Manifest for TFDS-built directories.

    tfds.builder("med_mnist/breastmnist_28", data_dir=D, file_format="tfrecord").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=NPZ_DIR))

The training and evaluation pipelines (and `manifest.load_manifest`) read TFRecord builds only.
TFDS itself can also prepare the builder with file_format="array_record", for random access
through `tfds.data_source`; this package's readers refuse such a directory.

Image ids are HMACs like the converter's, keyed by $MERMED_ID_KEY when set (then they equal the
converter's ids). Without it a fixed public key is used: MedMNIST ids are public indices anyway.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import records
from data_pipelines.privacy import KEY_ENV, image_id, load_key
from data_pipelines.sources.medmnist_info import (
    FLAGS,
    SIZES,
    SPLITS,
    Flag,
    labels_to_indices,
)

PUBLIC_KEY = b"mermed-medmnist-public-indices"


@dataclasses.dataclass
class MedMnistConfig(tfds.core.BuilderConfig):
    flag: Flag | None = None
    size: int = 28

    @property
    def npz_name(self) -> str:
        return f"{self.flag.name}.npz" if self.size == 28 else f"{self.flag.name}_{self.size}.npz"


def _configs() -> list[MedMnistConfig]:
    return [
        MedMnistConfig(name=f"{flag.name}_{size}", description=f"{flag.name} at {size}x{size}", flag=flag, size=size)
        for flag in FLAGS.values()
        for size in SIZES
    ]


def pixel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel / 255 with every image weighted equally (as the converter does)."""
    x = images.reshape(len(images), -1, images.shape[-1] if images.ndim == 4 else 1).astype(np.float64) / 255.0
    mean = x.mean(axis=1).mean(axis=0)
    second = np.square(x).mean(axis=1).mean(axis=0)
    return mean.tolist(), np.sqrt(np.maximum(second - mean**2, 0.0)).tolist()


def class_counts(labels: np.ndarray, flag: Flag) -> list[int]:
    """Records carrying each label (positives per label for multi-label flags)."""
    counts = np.zeros(len(flag.label_names), np.int64)
    for row in labels.reshape(len(labels), -1):
        counts[list(labels_to_indices(row, flag.multi_label))] += 1
    return counts.tolist()


class MedMnist(tfds.core.GeneratorBasedBuilder):
    """MedMNIST v2 2D flags in the mermed shard schema."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Flat mermed Example schema (image, labels as int64 list, modality, ids)."}
    BUILDER_CONFIGS = _configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the MedMNIST npz files (https://medmnist.com, Zenodo record 10519652) and place them "
        "in manual_dir under their official names, e.g. pathmnist.npz or pathmnist_64.npz."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        flag, size = self.builder_config.flag, self.builder_config.size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, flag.channels), encoding_format="png"),
                "image_format": tfds.features.Text(),
                "height": tfds.features.Scalar(np.int64),
                "width": tfds.features.Scalar(np.int64),
                "channels": tfds.features.Scalar(np.int64),
                "modality": tfds.features.Text(),
                "labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "dataset": tfds.features.Text(),
                "image_id": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage="https://medmnist.com",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = dl_manager.manual_dir / self.builder_config.npz_name
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        flag = self.builder_config.flag
        with np.load(os.fspath(path)) as npz:
            arrays = {s: (npz[f"{s}_images"], npz[f"{s}_labels"]) for s in SPLITS if f"{s}_images" in npz.files}
        stats = {s: pixel_stats(images) for s, (images, _) in arrays.items()}
        self.info.metadata.update({
            "modality": flag.modality, "label_names": list(flag.label_names), "multi_label": flag.multi_label,
            "channels": flag.channels, "pixel_depth": 8, "feature_spec": records.FEATURE_SPEC,
            "mean": {s: m for s, (m, _) in stats.items()}, "std": {s: sd for s, (_, sd) in stats.items()},
            "class_counts": {s: class_counts(labels, flag) for s, (_, labels) in arrays.items()},
        })
        key = load_key() if os.environ.get(KEY_ENV) else PUBLIC_KEY
        return {s: self._generate_examples(path.name, s, images, labels, key) for s, (images, labels) in arrays.items()}

    def _generate_examples(self, npz_name: str, split: str, images: np.ndarray, labels: np.ndarray, key: bytes):
        flag = self.builder_config.flag
        labels = labels.reshape(len(images), -1)
        for i, image in enumerate(images):
            pixels = image[:, :, None] if image.ndim == 2 else image
            height, width, channels = pixels.shape
            # Same key string as the converter's MedMnistSource, so ids agree under one key.
            yield i, {
                "image": io.BytesIO(records.encode_png(pixels)),
                "image_format": "png",
                "height": height,
                "width": width,
                "channels": channels,
                "modality": flag.modality,
                "labels": np.asarray(labels_to_indices(labels[i], flag.multi_label), np.int64),
                "dataset": f"{flag.name}_{self.builder_config.size}",
                "image_id": image_id(key, f"{npz_name}/{split}/{i}"),
            }
