"""manifest.json: what a converted dataset directory holds, so readers never list or guess files.

Directory layout of one converted dataset (DIR a local path or a gs:// or s3:// URL, see storage.py):
    DIR/<dataset>/manifest.json
    DIR/<dataset>/<split>-NNNNN-of-MMMMM.tfrecord        (format "tfrecord", the only one read)
    DIR/<dataset>/<split>-NNNNN-of-MMMMM.tfrecord.index  its records' byte offsets, then its size,
                                                        as little-endian uint64 (records.INDEX_DTYPE)

A reader takes each record with one read of its extent from the index, instead of scanning every
shard's headers first (which on a bucket means downloading the whole dataset on every host). The
manifest lists each shard's index and byte size, so the index is checked against the shard it
describes; a shard without an index (TFDS-built, or converted before indexes existed) is scanned.

The manifest records per split the shard files with record counts and sha256, per-class counts,
and the per-channel pixel mean/std measured during conversion (on pixel / max value, i.e. in
[0, 1], the scale normalisation constants use; every image weighs the same whatever its size, so
split statistics pool exactly from record counts); CT datasets list their windows (one per channel).
It never holds a source path, file name or DICOM tag value: only counts, names chosen by the user
(dataset, labels) and statistics.

`load_manifest` also reads a TFDS-built directory (DATA_DIR/med_mnist/<config>/<version>, see
tfds_medmnist.py): its dataset_info.json gives shard files and counts, its metadata.json the rest.
TFDS records no shard checksums, so those shards have sha256 None. Every reader of this package
reads TFRecord shards only, so `load_manifest` refuses a directory in another format (a TFDS
build prepared with file_format="array_record", say) instead of handing out paths nothing reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from etils import epath

from data_pipelines import storage

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: shards carry their index file and size; version 1 manifests still load
TFDS_INFO_NAME = "dataset_info.json"
TFDS_METADATA_NAME = "metadata.json"
FORMATS = ("tfrecord",)  # shard formats the readers of this package read


@dataclasses.dataclass(frozen=True)
class Window:
    """A CT intensity window in HU: values in [level - width/2, level + width/2] map to 0..255."""

    name: str
    level: float
    width: float


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str  # relative to the dataset directory
    num_records: int
    sha256: str | None  # None for TFDS-built shards (TFDS records no checksum)
    index: str | None = None  # its index file (index_name), relative; None: readers scan the shard
    num_bytes: int | None = None  # the shard's size, the index's last entry


@dataclasses.dataclass(frozen=True)
class Split:
    shards: tuple[Shard, ...]
    num_records: int
    class_counts: tuple[int, ...]  # per label index: records carrying that label
    mean: tuple[float, ...]  # per channel, pixel / max value
    std: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    dataset: str
    modality: str
    format: str
    label_names: tuple[str, ...]
    multi_label: bool
    pixel_depth: int  # 8 or 16 bits per channel in the stored PNGs
    channels: int
    feature_spec: dict[str, dict[str, str]]
    splits: dict[str, Split]
    windows: tuple[Window, ...] | None = None
    directory: epath.Path | None = dataclasses.field(default=None, compare=False)

    @property
    def mean(self) -> tuple[float, ...]:
        """Pixel mean of the train split (or of all splits pooled when there is no train split)."""
        return self._stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._stats()[1]

    def _stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if "train" in self.splits:
            return self.splits["train"].mean, self.splits["train"].std
        return pooled_stats(list(self.splits.values()))

    def shard_paths(self, split: str) -> list[epath.Path]:
        """Absolute paths of a split's shards, in order; KeyError names the available splits."""
        if split not in self.splits:
            raise KeyError(f"{self.dataset}: no split {split!r}; has {sorted(self.splits)}")
        if self.directory is None:
            raise ValueError("manifest has no directory; load it with load_manifest")
        return [self.directory / s.file for s in self.splits[split].shards]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("directory")
        data["version"] = MANIFEST_VERSION
        return data


def pooled_stats(splits: list[Split]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std over the union of several splits, from their counts, means and stds."""
    total = sum(s.num_records for s in splits)
    if total == 0:
        return (), ()
    channels = len(splits[0].mean)
    mean = [sum(s.num_records * s.mean[c] for s in splits) / total for c in range(channels)]
    second = [sum(s.num_records * (s.std[c] ** 2 + s.mean[c] ** 2) for s in splits) / total for c in range(channels)]
    std = [max(second[c] - mean[c] ** 2, 0.0) ** 0.5 for c in range(channels)]
    return tuple(mean), tuple(std)


def shard_name(split: str, index: int, count: int, fmt: str) -> str:
    """`<split>-NNNNN-of-MMMMM.<format>`, the file name of shard `index` of `count`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not in {FORMATS}")
    return f"{split}-{index:05d}-of-{count:05d}.{fmt}"


def index_name(shard_file: str) -> str:
    """The name of a shard's index file (see module docstring)."""
    return shard_file + ".index"


def file_sha256(location: str | os.PathLike) -> str:
    """sha256 of a file or bucket object, streamed (a bucket object is read again from the start
    when a transient error interrupts it)."""
    def digest() -> str:
        hasher = hashlib.sha256()
        with storage.path(location).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest()

    return storage.retrying(digest, location, "hashing") if storage.is_remote(location) else digest()


def save_manifest(manifest: Manifest, directory: str | os.PathLike) -> epath.Path:
    """Writes manifest.json whole (storage.write_text), so a reader never sees half a file."""
    path = storage.path(storage.join(directory, MANIFEST_NAME))
    storage.write_text(path, json.dumps(manifest.to_json(), indent=1, sort_keys=True))
    return path


def _from_json(data: dict[str, Any], directory: epath.Path) -> Manifest:
    if data.get("version") not in (1, MANIFEST_VERSION):
        raise ValueError(f"{directory / MANIFEST_NAME}: unsupported manifest version {data.get('version')!r}")
    splits = {
        name: Split(
            shards=tuple(Shard(**s) for s in split["shards"]),
            num_records=split["num_records"],
            class_counts=tuple(split["class_counts"]),
            mean=tuple(split["mean"]),
            std=tuple(split["std"]),
        )
        for name, split in data["splits"].items()
    }
    windows = data.get("windows")
    return Manifest(
        dataset=data["dataset"],
        modality=data["modality"],
        format=data["format"],
        label_names=tuple(data["label_names"]),
        multi_label=data["multi_label"],
        pixel_depth=data["pixel_depth"],
        channels=data["channels"],
        feature_spec=data["feature_spec"],
        splits=splits,
        windows=tuple(Window(**w) for w in windows) if windows is not None else None,
        directory=directory,
    )


def _from_tfds(directory: epath.Path) -> Manifest:
    """A Manifest for a directory built by a TFDS builder of this package (tfds_medmnist)."""
    info = json.loads(storage.read_text(directory / TFDS_INFO_NAME))
    meta_path = directory / TFDS_METADATA_NAME
    meta = json.loads(storage.read_text(meta_path)) if storage.exists(meta_path) else {}
    missing = [k for k in ("modality", "label_names", "channels", "mean", "std", "class_counts") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: not built by a mermed TFDS builder (metadata lacks {missing})")
    fmt = info.get("fileFormat", "tfrecord")
    splits = {}
    for split in info["splits"]:
        name, lengths = split["name"], [int(n) for n in split["shardLengths"]]
        template = split.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
        files = [
            template.replace("{DATASET}", info["name"]).replace("{SPLIT}", name).replace("{FILEFORMAT}", fmt)
            .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}")
            for i in range(len(lengths))
        ]
        splits[name] = Split(
            shards=tuple(Shard(f, n, None) for f, n in zip(files, lengths)),
            num_records=sum(lengths),
            class_counts=tuple(meta["class_counts"][name]),
            mean=tuple(meta["mean"][name]),
            std=tuple(meta["std"][name]),
        )
    return Manifest(
        dataset=info.get("configName") or info["name"], modality=meta["modality"], format=fmt,
        label_names=tuple(meta["label_names"]), multi_label=meta.get("multi_label", False),
        pixel_depth=meta.get("pixel_depth", 8), channels=meta["channels"], feature_spec=meta.get("feature_spec", {}),
        splits=splits, directory=directory,
    )


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a converted dataset directory (DIR/<dataset>) or of a TFDS-built one.

    `directory` may be a bucket URL. Raises ValueError for shards in a format outside FORMATS,
    which no reader here reads, and StorageError naming the location when its bucket is missing
    or may not be read.
    """
    directory = storage.path(directory)
    if not storage.is_remote(directory):
        directory = directory.resolve()
    path = directory / MANIFEST_NAME
    found = storage.exists(path)
    if not found and storage.exists(directory / TFDS_INFO_NAME):
        try:
            manifest = _from_tfds(directory)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{directory}: malformed TFDS dataset info ({type(e).__name__}: {e})") from e
        remedy = "prepare the TFDS build with file_format='tfrecord'"
    elif not found:
        storage.check_bucket(directory, writable=False)  # a missing bucket, named as such
        raise FileNotFoundError(f"{path}: no manifest (is {directory} a converted dataset directory?)")
    else:
        try:
            manifest = _from_json(json.loads(storage.read_text(path)), directory)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e
        remedy = "convert it again (the converter writes tfrecord)"
    if manifest.format not in FORMATS:
        raise ValueError(f"{directory}: shards in format {manifest.format!r}, which this package's readers do not "
                         f"read (they read {', '.join(FORMATS)}); {remedy}")
    return manifest


def verify_shards(manifest: Manifest) -> None:
    """Recomputes every shard's sha256; raises ValueError naming the first file that differs.

    Shards without a recorded checksum (TFDS-built) are only checked to exist.
    """
    for split in manifest.splits:
        for shard, path in zip(manifest.splits[split].shards, manifest.shard_paths(split)):
            if shard.sha256 is None:
                if not storage.exists(path):
                    raise ValueError(f"{path}: shard listed by the dataset info is missing")
                continue
            actual = file_sha256(path)
            if actual != shard.sha256:
                raise ValueError(f"{path}: sha256 {actual} differs from the manifest's {shard.sha256}")
