"""manifest.json: what a converted dataset directory holds, so readers never list or guess files.

Directory layout of one converted dataset:
    DIR/<dataset>/manifest.json
    DIR/<dataset>/<split>-NNNNN-of-MMMMM.tfrecord        (format "tfrecord")
    DIR/<dataset>/<split>-NNNNN-of-MMMMM.array_record    (format "array_record", same Examples)

The manifest records per split the shard files with record counts and sha256, per-class counts,
and the per-channel pixel mean/std measured during conversion (on pixel / max value, i.e. in
[0, 1], the scale normalisation constants use; every image weighs the same whatever its size, so
split statistics pool exactly from record counts); CT datasets list their windows (one per channel).
It never holds a source path, file name or DICOM tag value: only counts, names chosen by the user
(dataset, labels) and statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("tfrecord", "array_record")


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
    sha256: str


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
    directory: pathlib.Path | None = dataclasses.field(default=None, compare=False)

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

    def shard_paths(self, split: str) -> list[pathlib.Path]:
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


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_manifest(manifest: Manifest, directory: str | os.PathLike) -> pathlib.Path:
    """Writes manifest.json atomically (write then rename), so a reader never sees half a file."""
    path = pathlib.Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def _from_json(data: dict[str, Any], directory: pathlib.Path) -> Manifest:
    if data.get("version") != MANIFEST_VERSION:
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


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a converted dataset directory (DIR/<dataset>), with absolute shard paths."""
    directory = pathlib.Path(directory).resolve()
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (is {directory} a converted dataset directory?)")
    try:
        data = json.loads(path.read_text())
        return _from_json(data, directory)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e


def verify_shards(manifest: Manifest) -> None:
    """Recomputes every shard's sha256; raises ValueError naming the first file that differs."""
    for split in manifest.splits:
        for shard, path in zip(manifest.splits[split].shards, manifest.shard_paths(split)):
            actual = file_sha256(path)
            if actual != shard.sha256:
                raise ValueError(f"{path}: sha256 {actual} differs from the manifest's {shard.sha256}")
