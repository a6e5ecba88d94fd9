"""Which records a host reads, and random access to them by (file, byte offset).

Files come from the manifests of converted dataset directories (or TFDS's dataset_info.json),
never from listing folders. Per
modality, the sorted file list is dealt to hosts whole (file f goes to host f mod P) as far as it
divides; the last (num_files mod P) files, which would leave some hosts with one file fewer, are
split by record into P near-equal contiguous chunks instead. So no host reads a record another
host reads, every record is read by some host, and when a modality has fewer files than hosts
every host still gets records of it. Offsets are indexed once, at construction, from the record
headers (`records.index_records`); reads then go straight to one record and check its CRCs.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import pathlib
import threading
from concurrent import futures
from typing import Sequence

import numpy as np
from etils import epath
from google.protobuf import message
from tensorflow_datasets.core import naming

from data_pipelines import manifest as manifest_lib
from data_pipelines import records
from data_pipelines.modalities import modality_id

_MAX_OPEN_FILES = 64  # per reading thread
_TFDS_INFO = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: str
    num_records: int


def list_shards(dirs: Sequence[str | os.PathLike], split: str) -> dict[int, list[ShardFile]]:
    """Shard files of `split` per modality id, over all dataset directories, sorted by path.

    A directory is either the converter's (manifest.json) or one prepared by a TFDS builder of
    the same Example schema (dataset_info.json; its modality is read from its first record).
    """
    by_modality: dict[int, list[ShardFile]] = collections.defaultdict(list)
    for directory in map(pathlib.Path, dirs):
        if (directory / manifest_lib.MANIFEST_NAME).is_file():
            modality, shards = _manifest_shards(directory, split)
        elif (directory / _TFDS_INFO).is_file():
            modality, shards = _tfds_shards(directory, split)
        else:
            raise FileNotFoundError(f"{directory}: neither {manifest_lib.MANIFEST_NAME} (converter) nor "
                                    f"{_TFDS_INFO} (TFDS) found")
        by_modality[modality].extend(shards)
    return {m: sorted(files, key=lambda f: f.path) for m, files in sorted(by_modality.items())}


def _manifest_shards(directory: pathlib.Path, split: str) -> tuple[int, list[ShardFile]]:
    manifest = records.load_manifest(directory)  # refuses shard formats other than TFRecord
    shards = [ShardFile(str(path), shard.num_records)
              for shard, path in zip(manifest.splits[split].shards, manifest.shard_paths(split))]
    return modality_id(manifest.modality), shards


def _tfds_shards(directory: pathlib.Path, split: str) -> tuple[int, list[ShardFile]]:
    info = json.loads((directory / _TFDS_INFO).read_text())
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "tfrecord":
        raise ValueError(f"{directory}: TFDS file format {file_format!r} is not read by the pipeline; "
                         f"prepare with file_format='tfrecord'")
    splits = {s["name"]: s for s in info.get("splits", [])}
    if split not in splits:
        raise KeyError(f"{directory}: no split {split!r}; has {sorted(splits)}")
    lengths = [int(n) for n in splits[split].get("shardLengths", [])]
    template = naming.ShardedFileTemplate(
        data_dir=epath.Path(directory), template=splits[split].get("filepathTemplate", naming.DEFAULT_FILENAME_TEMPLATE),
        dataset_name=info["name"], split=split, filetype_suffix="tfrecord")
    shards = [ShardFile(str(path), n) for path, n in zip(template.sharded_filepaths(len(lengths)), lengths)]
    if not shards:
        raise ValueError(f"{directory}: split {split!r} has no shards")
    first = records.decode_example(records.read_record_at(shards[0].path, 0))
    return modality_id(first["modality"]), shards


@dataclasses.dataclass(frozen=True)
class HostRecords:
    """The records one host reads for one modality, as parallel arrays grouped in units.

    Record i lives in files[file_ids[i]] at byte offset offsets[i]; records
    [unit_starts[u], unit_starts[u + 1]) form unit u, a whole file or a record-level chunk.
    `missing` counts records the manifest lists but damaged shards lost (skip_corrupt only).
    """

    files: tuple[str, ...]
    file_ids: np.ndarray
    offsets: np.ndarray
    unit_starts: np.ndarray
    missing: int = 0

    def __len__(self) -> int:
        return len(self.offsets)


def index_shard(shard: ShardFile, skip_corrupt: bool = False) -> np.ndarray:
    """Record offsets of one shard, checked against the manifest's count.

    A truncated or header-corrupt shard raises CorruptRecordError naming the file and offset;
    under `skip_corrupt` the records before the damage are kept and the loss is logged (the
    caller counts it from the manifest's count).
    """
    try:
        offsets = records.index_records(shard.path)
    except records.CorruptRecordError as e:
        if not skip_corrupt:
            raise
        offsets = _readable_prefix(shard.path)
        logging.warning("%s; keeping the %d records before it (skip_corrupt=True)", e, len(offsets))
        return offsets
    if len(offsets) != shard.num_records:
        raise ValueError(f"{shard.path}: {len(offsets)} records found, the manifest says {shard.num_records}")
    return offsets


def _readable_prefix(path: str) -> np.ndarray:
    """Offsets of the records before the first damaged one (TFRecord has no resync marker)."""
    offsets = []
    try:
        for offset, _ in records.iter_records(path):
            offsets.append(offset)
    except records.CorruptRecordError:
        pass
    return np.asarray(offsets, np.int64)


def host_records(shards: Sequence[ShardFile], process_index: int, process_count: int,
                 skip_corrupt: bool = False, index_threads: int = 8) -> HostRecords:
    """This host's records of one modality's shards (see module docstring for the split)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    whole_count = len(shards) - len(shards) % process_count
    whole = list(shards[process_index:whole_count:process_count])
    rest = list(shards[whole_count:])
    index = functools.partial(index_shard, skip_corrupt=skip_corrupt)
    with futures.ThreadPoolExecutor(max(1, index_threads)) as pool:
        whole_offsets = list(pool.map(index, whole))
        rest_offsets = list(pool.map(index, rest))
    # Records a damaged shard lost; the host holding the shard (or every host, for the shared
    # record-level remainder, divided among them) accounts for them.
    missing = sum(s.num_records - len(o) for s, o in zip(whole, whole_offsets))
    rest_missing = sum(s.num_records - len(o) for s, o in zip(rest, rest_offsets))
    missing += rest_missing // process_count + (process_index < rest_missing % process_count)
    files = tuple(s.path for s in whole + rest)
    file_ids = [np.full(len(o), i, np.int32) for i, o in enumerate(whole_offsets)]
    offsets = list(whole_offsets)
    sizes = [len(o) for o in whole_offsets]
    if rest:
        rest_ids = np.concatenate([np.full(len(o), len(whole) + i, np.int32) for i, o in enumerate(rest_offsets)])
        rest_all = np.concatenate(rest_offsets)
        bounds = np.linspace(0, len(rest_all), process_count + 1).round().astype(np.int64)
        lo, hi = bounds[process_index], bounds[process_index + 1]
        file_ids.append(rest_ids[lo:hi])
        offsets.append(rest_all[lo:hi])
        sizes.append(int(hi - lo))
    sizes_arr = np.asarray([s for s in sizes if s > 0], np.int64)
    return HostRecords(
        files=files,
        file_ids=np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32),
        offsets=np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
        unit_starts=np.concatenate([[0], np.cumsum(sizes_arr)]).astype(np.int64),
        missing=missing,
    )


class RecordReader:
    """Reads CRC-checked record payloads by (path, offset), keeping files open per thread.

    Grain reads elements on several threads; each thread gets its own open files (a shared
    handle's seek + read would race). Picklable, so it travels to Grain worker processes.
    """

    def __init__(self):
        self._local = threading.local()

    def read(self, path: str, offset: int) -> bytes:
        cache = getattr(self._local, "files", None)
        if cache is None:
            cache = self._local.files = collections.OrderedDict()
        reader = cache.pop(path, None) or records.RecordFileReader(path)
        cache[path] = reader
        if len(cache) > _MAX_OPEN_FILES:
            cache.popitem(last=False)[1].close()
        return reader.read(offset)

    def read_image(self, path: str, offset: int) -> tuple[dict, np.ndarray]:
        """The record at (path, offset) decoded: its Example features and its RGB image.

        Any failure to read or decode is a CorruptRecordError naming the file and offset, so the
        training and evaluation pipelines skip or report a bad record the same way.
        """
        try:
            example = records.decode_example(self.read(path, offset))
            return example, records.decode_image(example["image"], channels=3)
        except records.CorruptRecordError:
            raise
        except (ValueError, KeyError, message.DecodeError) as e:
            raise records.CorruptRecordError(path, offset, f"{type(e).__name__}: {e}") from e

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
