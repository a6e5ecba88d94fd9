"""Which records a host reads, and random access to them by (file, byte offset).

Files come from the manifests of converted dataset directories (or TFDS's dataset_info.json),
never from listing folders. Per
modality, the sorted file list is dealt to hosts whole (file f goes to host f mod P) as far as it
divides; the last (num_files mod P) files, which would leave some hosts with one file fewer, are
split by record into P near-equal contiguous chunks instead. So no host reads a record another
host reads, every record is read by some host, and when a modality has fewer files than hosts
every host still gets records of it.

Directories may be local or in a bucket (gs://, s3://; see storage.py). Record extents come once,
at construction, from each shard's index file (manifest.py), checked against the manifest and
against the shard's size in one listing of the directory; a shard without an index, or whose size
has changed, has its record headers scanned instead (`records.record_extents`, which reads a
bucket object whole). A read is then one read of one record's extent (a ranged request for a
bucket object), CRC-checked; a batch's bucket reads are all issued at once (`RecordReader.fetch`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import threading
from concurrent import futures
from typing import Sequence

import numpy as np
from etils import epath
from google.protobuf import message
from tensorflow_datasets.core import naming

from data_pipelines import manifest as manifest_lib
from data_pipelines import records, storage
from data_pipelines.modalities import modality_id

_MAX_OPEN_FILES = 64  # per reading thread
_TFDS_INFO = "dataset_info.json"


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: str
    num_records: int
    index: str | None = None  # location of its index file; None: scan the shard
    num_bytes: int | None = None  # the manifest's size of the shard, the index's last entry


def list_shards(dirs: Sequence[str | os.PathLike], split: str) -> dict[int, list[ShardFile]]:
    """Shard files of `split` per modality id, over all dataset directories, sorted by path.

    A directory is either the converter's (manifest.json) or one prepared by a TFDS builder of
    the same Example schema (dataset_info.json; its modality is read from its first record).
    """
    by_modality: dict[int, list[ShardFile]] = collections.defaultdict(list)
    for directory in map(storage.path, dirs):
        if storage.exists(directory / manifest_lib.MANIFEST_NAME):
            manifest = records.load_manifest(directory)  # refuses shard formats other than TFRecord
            modality, shards = modality_id(manifest.modality), manifest_shard_files(manifest, split)
        elif storage.exists(directory / _TFDS_INFO):
            modality, shards = _tfds_shards(directory, split)
        else:
            storage.check_bucket(directory, writable=False)  # a missing bucket, named as such
            raise FileNotFoundError(f"{directory}: neither {manifest_lib.MANIFEST_NAME} (converter) nor "
                                    f"{_TFDS_INFO} (TFDS) found")
        by_modality[modality].extend(shards)
    return {m: sorted(files, key=lambda f: f.path) for m, files in sorted(by_modality.items())}


def manifest_shard_files(manifest: manifest_lib.Manifest, split: str) -> list[ShardFile]:
    """The split's shards with their indexes, from one listing of the directory: a shard missing
    from it is an error naming the shard; one whose size differs from the manifest's (rewritten or
    truncated since), or whose index is missing, is scanned instead of trusting its index."""
    paths = manifest.shard_paths(split)  # KeyError naming the splits there are
    found = storage.list_sizes(manifest.directory)
    shards = []
    for shard, path in zip(manifest.splits[split].shards, paths):
        # A TFDS template may put shards in a subfolder, which the listing does not descend into.
        if shard.file not in found and not ("/" in shard.file and storage.exists(path)):
            raise FileNotFoundError(f"{path}: shard listed by the manifest is missing")
        index = shard.index
        if index is not None and (found[shard.file] != shard.num_bytes or index not in found):
            logging.warning("%s: %s; scanning its records instead of reading its index", path,
                            "index missing" if index not in found else
                            f"{found[shard.file]} bytes, the manifest says {shard.num_bytes}")
            index = None
        shards.append(ShardFile(os.fspath(path), shard.num_records,
                                None if index is None else storage.join(manifest.directory, index), shard.num_bytes))
    return shards


def _tfds_shards(directory: epath.Path, split: str) -> tuple[int, list[ShardFile]]:
    info = json.loads(storage.read_text(directory / _TFDS_INFO))
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
    shards = [ShardFile(os.fspath(path), n) for path, n in zip(template.sharded_filepaths(len(lengths)), lengths)]
    if not shards:
        raise ValueError(f"{directory}: split {split!r} has no shards")
    first = records.decode_example(records.read_record_at(shards[0].path, 0))
    return modality_id(first["modality"]), shards


@dataclasses.dataclass(frozen=True)
class HostRecords:
    """The records one host reads for one modality, as parallel arrays grouped in units.

    Record i lives in files[file_ids[i]] at byte offset offsets[i] and takes sizes[i] bytes
    (framing included); records [unit_starts[u], unit_starts[u + 1]) form unit u, a whole file or
    a record-level chunk. `missing` counts records the manifest lists but damaged shards lost
    (skip_corrupt only).
    """

    files: tuple[str, ...]
    file_ids: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    unit_starts: np.ndarray
    missing: int = 0

    def __len__(self) -> int:
        return len(self.offsets)


def index_shard(shard: ShardFile, skip_corrupt: bool = False) -> np.ndarray:
    """Record extents of one shard (int64 byte offsets, then the end of the last record), from its
    index or, without one, from a scan of its headers; checked against the manifest's count.

    An index that does not describe the shard the manifest lists raises ValueError naming it. A
    truncated or header-corrupt scanned shard raises CorruptRecordError naming the file and
    offset; under `skip_corrupt` the records before the damage are kept and the loss is logged
    (the caller counts it from the manifest's count).
    """
    if shard.index is not None:
        return _read_index(shard)
    try:
        extents = records.record_extents(shard.path).astype(np.int64)
    except records.CorruptRecordError as e:
        if not skip_corrupt:
            raise
        extents = _readable_prefix(shard.path)
        logging.warning("%s; keeping the %d records before it (skip_corrupt=True)", e, len(extents) - 1)
        return extents
    if len(extents) - 1 != shard.num_records:
        raise ValueError(f"{shard.path}: {len(extents) - 1} records found, the manifest says {shard.num_records}")
    return extents


def _read_index(shard: ShardFile) -> np.ndarray:
    raw = storage.read_bytes(shard.index)
    extents = np.frombuffer(raw[:len(raw) - len(raw) % 8], records.INDEX_DTYPE).astype(np.int64)
    sizes = np.diff(extents)
    if (len(raw) % 8 or len(extents) != shard.num_records + 1 or extents[0] != 0 or extents[-1] != shard.num_bytes
            or (sizes.size and sizes.min() < records.FRAMING_BYTES)):
        raise ValueError(f"{shard.index}: not the index of {shard.path} as the manifest lists it ({shard.num_records} "
                         f"records, {shard.num_bytes} bytes); convert the dataset again")
    return extents


def _readable_prefix(path: str) -> np.ndarray:
    """Extents of the records before the first damaged one (TFRecord has no resync marker)."""
    extents = [0]
    try:
        for offset, payload in records.iter_records(path):
            extents.append(offset + records.FRAMING_BYTES + len(payload))
    except records.CorruptRecordError:
        pass
    return np.asarray(extents, np.int64)


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
        whole_extents = list(pool.map(index, whole))
        rest_extents = list(pool.map(index, rest))
    whole_offsets = [e[:-1] for e in whole_extents]
    rest_offsets = [e[:-1] for e in rest_extents]
    whole_sizes = [np.diff(e) for e in whole_extents]
    rest_sizes = [np.diff(e) for e in rest_extents]
    # Records a damaged shard lost; the host holding the shard (or every host, for the shared
    # record-level remainder, divided among them) accounts for them.
    missing = sum(s.num_records - len(o) for s, o in zip(whole, whole_offsets))
    rest_missing = sum(s.num_records - len(o) for s, o in zip(rest, rest_offsets))
    missing += rest_missing // process_count + (process_index < rest_missing % process_count)
    files = tuple(s.path for s in whole + rest)
    file_ids = [np.full(len(o), i, np.int32) for i, o in enumerate(whole_offsets)]
    offsets = list(whole_offsets)
    sizes = list(whole_sizes)
    units = [len(o) for o in whole_offsets]
    if rest:
        rest_ids = np.concatenate([np.full(len(o), len(whole) + i, np.int32) for i, o in enumerate(rest_offsets)])
        rest_all = np.concatenate(rest_offsets)
        bounds = np.linspace(0, len(rest_all), process_count + 1).round().astype(np.int64)
        lo, hi = bounds[process_index], bounds[process_index + 1]
        file_ids.append(rest_ids[lo:hi])
        offsets.append(rest_all[lo:hi])
        sizes.append(np.concatenate(rest_sizes)[lo:hi])
        units.append(int(hi - lo))
    units_arr = np.asarray([u for u in units if u > 0], np.int64)
    return HostRecords(
        files=files,
        file_ids=np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32),
        offsets=np.concatenate(offsets) if offsets else np.zeros(0, np.int64),
        sizes=np.concatenate(sizes) if sizes else np.zeros(0, np.int64),
        unit_starts=np.concatenate([[0], np.cumsum(units_arr)]).astype(np.int64),
        missing=missing,
    )


class RecordReader:
    """Reads CRC-checked record payloads by (path, offset, framed size).

    Local files stay open per thread (Grain reads elements on several threads, and a shared
    handle's seek + read would race); a bucket record is one ranged request, and `fetch` puts a
    whole batch's requests in flight at once. Picklable, so it travels to Grain worker processes.
    """

    def __init__(self):
        self._local = threading.local()

    def read(self, path: str, offset: int, size: int) -> bytes:
        if storage.is_remote(path):
            return records.parse_record(path, offset, storage.read_range(path, offset, offset + size))
        cache = getattr(self._local, "files", None)
        if cache is None:
            cache = self._local.files = collections.OrderedDict()
        reader = cache.pop(path, None) or records.RecordFileReader(path)
        cache[path] = reader
        if len(cache) > _MAX_OPEN_FILES:
            cache.popitem(last=False)[1].close()
        return reader.read(offset, size)

    def fetch(self, extents: Sequence[tuple[str, int, int]]) -> dict[tuple[str, int], bytes]:
        """The framed bytes of the bucket records among `extents` ((path, offset, size) each), all
        requested together, keyed by (path, offset) for `read_image`; local records are left to be
        read when used. A missing or unreadable object raises StorageError naming it."""
        remote = [e for e in extents if storage.is_remote(e[0])]
        if not remote:
            return {}
        data = storage.read_ranges([p for p, _, _ in remote], [o for _, o, _ in remote],
                                   [o + n for _, o, n in remote])
        return {(p, o): d for (p, o, _), d in zip(remote, data)}

    def read_image(self, path: str, offset: int, size: int,
                   fetched: dict[tuple[str, int], bytes] | None = None) -> tuple[dict, np.ndarray]:
        """The record at (path, offset) decoded (from `fetched` when it is there): its Example
        features and its RGB image.

        Any failure to parse or decode is a CorruptRecordError naming the file and offset, so the
        training and evaluation pipelines skip or report a bad record the same way. Failing to
        read at all (a missing object, a denied request) is not: it raises whatever the read did.
        """
        framed = fetched.get((path, offset)) if fetched else None
        try:
            payload = self.read(path, offset, size) if framed is None else records.parse_record(path, offset, framed)
            example = records.decode_example(payload)
            return example, records.decode_image(example["image"], channels=3)
        except records.CorruptRecordError:
            raise
        except (ValueError, KeyError, message.DecodeError) as e:
            raise records.CorruptRecordError(path, offset, f"{type(e).__name__}: {e}") from e

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
