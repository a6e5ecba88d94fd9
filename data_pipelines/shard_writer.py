"""Conversion engine: a source's items -> planned shards -> parallel, resumable writing -> manifest.

The output directory is local or in a bucket (gs://, s3://; see storage.py). The plan (which
items go to which shard of which split) is a pure function of the source listing, the options and
the id key, so an interrupted conversion run again with the same arguments finds the same plan
(its digest is in .convert_state.json): shards already completed are kept, the rest are written.
The skip policy is not part of the plan: a run stopped by a bad input can be resumed with skipping
on (skips of kept shards stay recorded and reported).

Buckets have no rename, and an object appears only once its upload completes, so completion is
recorded by what is written after a shard rather than by renaming it: a shard is written locally
(under a .partial name beside a local output, in the temporary folder for a bucket), then moved
or uploaded whole, then its index (manifest.index_name), then its completion marker
(.convert_done.<shard>.json: the shard's statistics, size, sha256 and skipped ids). On resume a shard is kept
when its marker is there and one listing of the directory shows the shard and its index at the
recorded sizes (a local shard's sha256 is checked as well; a bucket shard's is not, which would
read the whole dataset back). manifest.json is written last, after every shard and index, and an
overwrite deletes it first, so a reader never finds a manifest naming shards that are not there.

`convert` runs these steps in one process and its pool; beam_convert.py runs the same pieces
(plan_shards, begin, write_shard, write_marker, kept_shard, read_markers, build_manifest) as a Beam pipeline,
which writes the same files.

Nothing written names a source: shards hold pixels, labels and HMAC ids; the state file holds the
plan's digest, the markers and the summary shard statistics and the hashed ids of skipped items. Bad inputs stop the conversion
with an error naming the item, or with `skip_bad` are skipped and counted per reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

import cv2
import numpy as np
from etils import epath
from tqdm import tqdm

from data_pipelines import manifest as mf
from data_pipelines import records, storage
from data_pipelines.privacy import image_id
from data_pipelines.sources.base import Frame, Item, Source, SourceError
from data_pipelines.splits import DEFAULT_FRACTIONS, assign_splits

STATE_NAME = ".convert_state.json"  # the plan's fingerprint
_MARKER = ".convert_done.{}.json"  # a completed shard's ShardResult
FORMAT = "tfrecord"  # the only shard format the readers read (manifest.FORMATS)
PARTIAL_SUFFIX = ".partial"


class ConversionError(RuntimeError):
    """A conversion that cannot go on: a bad input without skip policy, or a conflicting output."""


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    dataset: str
    out_dir: str | os.PathLike  # the dataset's files go to out_dir / dataset; a local path or a bucket URL
    shard_size: int = 1024  # source items per shard (a multi-frame item gives several records)
    workers: int = 1
    skip_bad: bool = False  # explicit skip policy: bad inputs are skipped and counted, not fatal
    fractions: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    @property
    def directory(self) -> epath.Path:
        return storage.path(storage.join(self.out_dir, self.dataset))


@dataclasses.dataclass(frozen=True)
class ShardTask:
    split: str
    name: str
    items: tuple[Item, ...]


@dataclasses.dataclass(frozen=True)
class ShardResult:
    name: str
    split: str
    num_records: int
    num_bytes: int
    sha256: str
    class_counts: tuple[int, ...]
    sum_mean: tuple[float, ...]  # per channel, sums over images of per-image means of pixel / max
    sum_sq: tuple[float, ...]  # same for squared values
    pixel_depth: int
    skipped: tuple[tuple[str, str], ...]  # (reason, hashed item id)


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    manifest: mf.Manifest
    written: dict[str, int]  # records per split
    skipped: dict[str, int]  # skipped items per reason
    skipped_ids: tuple[str, ...]
    reused_shards: int
    total_shards: int

    def summary(self) -> str:
        lines = [f"{self.manifest.dataset}: {sum(self.written.values())} records in {self.total_shards} shards "
                 f"({self.reused_shards} kept from an earlier run) -> {self.manifest.directory}"]
        lines += [f"  {split}: {n} records" for split, n in self.written.items()]
        if self.skipped:
            lines.append(f"  skipped {sum(self.skipped.values())} inputs:")
            lines += [f"    {n} x {reason}" for reason, n in sorted(self.skipped.items())]
            lines.append(f"  skipped item ids (HMAC): {', '.join(self.skipped_ids)}")
        else:
            lines.append("  skipped 0 inputs")
        return "\n".join(lines)


def plan_shards(items: list[Item], options: ConvertOptions) -> list[ShardTask]:
    """Splits (given, or stratified by patient) and a seeded shuffle into shards of shard_size items."""
    missing = [i for i, item in enumerate(items) if item.split is None]
    if missing:
        made = assign_splits(
            [items[i].labels for i in missing],
            [items[i].group or items[i].key for i in missing],
            options.fractions,
            options.seed,
        )
        for i, split in zip(missing, made):
            items[i] = dataclasses.replace(items[i], split=split)
    rng = np.random.default_rng(options.seed)
    tasks = []
    for split in sorted({item.split for item in items}):
        members = [item for item in items if item.split == split]
        members = [members[j] for j in rng.permutation(len(members))]
        count = max(1, math.ceil(len(members) / options.shard_size))
        for index in range(count):
            chunk = members[index * options.shard_size : (index + 1) * options.shard_size]
            tasks.append(ShardTask(split, mf.shard_name(split, index, count, FORMAT), tuple(chunk)))
    return tasks


def fingerprint(source: Source, tasks: list[ShardTask], key: bytes, options: ConvertOptions) -> str:
    """A digest of everything that decides the shards' contents; holds no source name (ids are HMACs)."""
    plan = {
        "dataset": options.dataset, "format": FORMAT, "modality": source.modality,
        "channels": source.channels, "labels": list(source.label_names),
        "windows": [dataclasses.astuple(w) for w in source.windows or ()],
        "shards": [[t.name, [image_id(key, item.key) for item in t.items]] for t in tasks],
    }
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def describe(source: Source, item: Item, item_id: str) -> str:
    """How errors name an item: its key for open sources, its hashed id for private ones (DICOM/NIfTI)."""
    return f"item {item_id}" if source.private else f"{source.__class__.__name__} item {item.key!r} (id {item_id})"


class _ShardStats:
    def __init__(self, source: Source):
        self.channels = source.channels
        self.class_counts = np.zeros(len(source.label_names), np.int64)
        self.sum_mean = np.zeros(source.channels)
        self.sum_sq = np.zeros(source.channels)
        self.depth = 8
        self.count = 0

    def add(self, pixels: np.ndarray, labels: tuple[int, ...]) -> None:
        # OpenCV's per-channel mean/std in double precision: ~10x faster than NumPy axis reductions.
        mean, std = (v.reshape(-1) / np.iinfo(pixels.dtype).max for v in cv2.meanStdDev(pixels))
        self.sum_mean += mean
        self.sum_sq += np.square(std) + np.square(mean)
        self.depth = max(self.depth, 8 * pixels.dtype.itemsize)
        self.class_counts[list(labels)] += 1
        self.count += 1


def _encode(frame: Frame) -> tuple[bytes, str]:
    if frame.encoded is not None:
        return frame.encoded, frame.image_format
    return records.encode_png(frame.pixels), "png"


def _load(source: Source, item: Item, item_id: str) -> list[Frame]:
    """All frames of an item (loaded before any is written, so a bad item leaves no partial records)."""
    try:
        frames = list(source.load(item))
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is a bug: name the item, keep the cause
        if source.private:
            # Not chained: a runner's worker (Beam's) logs the whole traceback, and the cause's
            # message may hold a path or a tag value of a private source.
            raise ConversionError(f"{describe(source, item, item_id)}: unexpected error ({type(e).__name__})") from None
        raise ConversionError(f"{describe(source, item, item_id)}: unexpected error ({type(e).__name__}: {e})") from e
    for frame in frames:
        pixels = frame.pixels
        if pixels.ndim != 3 or pixels.shape[2] != source.channels or pixels.dtype not in (np.uint8, np.uint16):
            raise ConversionError(
                f"{describe(source, item, item_id)}: source gave {pixels.dtype} pixels of shape {pixels.shape}; "
                f"expected HxWx{source.channels} uint8/uint16"
            )
    return frames


def write_shard(source: Source, key: bytes, options: ConvertOptions, task: ShardTask) -> ShardResult:
    """Writes one shard, then its index (see module docstring), and measures it."""
    final = os.fspath(options.directory / task.name)
    if storage.is_remote(final):
        handle, partial = tempfile.mkstemp(prefix=f"{options.dataset}.{task.name}.", suffix=PARTIAL_SUFFIX)
        os.close(handle)
    else:
        partial = final + PARTIAL_SUFFIX
    try:
        result, extents = _write_records(source, key, options, task, partial)
        storage.publish(partial, final)
    finally:
        if storage.is_remote(final) and os.path.exists(partial):
            os.remove(partial)
    storage.write_bytes(storage.join(options.directory, mf.index_name(task.name)), extents.tobytes())
    return result


def _write_records(source: Source, key: bytes, options: ConvertOptions, task: ShardTask,
                   partial: str) -> tuple[ShardResult, np.ndarray]:
    """Writes a shard's records to the local file `partial`; returns its measures and its index."""
    stats = _ShardStats(source)
    skipped = []
    writer = records.TFRecordWriter(partial)
    try:
        for item in task.items:
            item_id = image_id(key, item.key)
            if any(not 0 <= label < len(source.label_names) for label in item.labels):
                raise ConversionError(f"{describe(source, item, item_id)}: labels {item.labels} out of range")
            try:
                frames = _load(source, item, item_id)
            except SourceError as e:
                if not options.skip_bad:
                    raise ConversionError(
                        f"{describe(source, item, item_id)}: {e if not source.private else e.reason} "
                        "(use the skip policy, --skip-bad, to skip and count such inputs)"
                    ) from None
                skipped.append((e.reason, item_id))
                continue
            for frame in frames:
                encoded, image_format = _encode(frame)
                height, width, channels = frame.pixels.shape
                writer.write(records.encode_example(
                    image=encoded, image_format=image_format, height=height, width=width, channels=channels,
                    modality=source.modality, labels=item.labels, dataset=options.dataset,
                    image_id=image_id(key, item.key + frame.suffix),
                ))
                stats.add(frame.pixels, item.labels)
    finally:
        writer.close()
    extents = writer.extents
    return ShardResult(
        name=task.name, split=task.split, num_records=stats.count, num_bytes=int(extents[-1]),
        sha256=mf.file_sha256(partial),
        class_counts=tuple(int(c) for c in stats.class_counts), sum_mean=tuple(stats.sum_mean.tolist()),
        sum_sq=tuple(stats.sum_sq.tolist()), pixel_depth=stats.depth, skipped=tuple(skipped),
    ), extents


_WORKER: tuple[Source, bytes, ConvertOptions] | None = None


def _init_worker(source: Source, key: bytes, options: ConvertOptions) -> None:
    global _WORKER
    _WORKER = (source, key, options)


def _run_task(task: ShardTask) -> ShardResult:
    assert _WORKER is not None, "worker not initialised"
    return write_shard(*_WORKER, task)


def begin(directory: epath.Path, fingerprint: str, overwrite: bool) -> dict[str, int]:
    """Readies the output for a plan before any shard: refuses to mix with a different one (or, with
    overwrite, deletes it, manifest first) and records the plan's fingerprint, so a run that fails
    at once can resume. Returns {name: size} of the files an earlier run of this plan left."""
    storage.check_bucket(directory, writable=True)  # a missing bucket or permission, named before any work
    found = storage.list_sizes(directory)
    if overwrite:
        # The manifest first: a reader must never find one naming deleted shards.
        for name in sorted(found, key=lambda n: n != mf.MANIFEST_NAME):
            storage.remove(directory / name)
        found = {}
    elif STATE_NAME not in found:
        if found:
            raise ConversionError(f"{directory} holds files from another conversion; pass overwrite to replace them")
    elif json.loads(storage.read_text(directory / STATE_NAME)).get("fingerprint") != fingerprint:
        raise ConversionError(
            f"{directory} holds a conversion with a different plan (source, options or key); "
            "pass overwrite to replace it"
        )
    storage.makedirs(directory)
    storage.write_text(directory / STATE_NAME, json.dumps({"fingerprint": fingerprint}))
    return found


def completed(directory: epath.Path, found: dict[str, int]) -> dict[str, ShardResult]:
    """The shards that an earlier run of the plan completed, by name: those of `found` (a listing
    of the directory: begin's, or kept_shard's of one shard) with a marker whose shard and index
    are there at the recorded sizes (and, locally, the recorded sha256)."""
    prefix, suffix = _MARKER.split("{}")
    names = [n.removeprefix(prefix).removesuffix(suffix) for n in found if n.startswith(prefix) and n.endswith(suffix)]
    return {r.name: r for r in read_markers(directory, names) if _is_complete(directory, r, found)}


def kept_shard(directory: epath.Path, name: str) -> ShardResult | None:
    """Shard `name` as an earlier run of the plan completed it, or None: `completed` for one shard,
    asked by whoever writes it (a Beam worker) of its own three files rather than of a listing."""
    marker = _MARKER.format(name)
    if not storage.exists(directory / marker):  # one request for a shard not yet written
        return None
    found = {n: storage.size(directory / n) for n in (name, mf.index_name(name)) if storage.exists(directory / n)}
    return completed(directory, {marker: 0, **found}).get(name)  # (a marker's size is not looked at)


def read_marker(directory: epath.Path, name: str) -> ShardResult:
    """The recorded result of shard `name` (its marker must exist)."""
    return _result_from_json(json.loads(storage.read_text(directory / _MARKER.format(name))))


def read_markers(directory: epath.Path, names: list[str]) -> list[ShardResult]:
    """read_marker of each name, in order, read in parallel (one request each on a bucket)."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda name: read_marker(directory, name), names))


def write_marker(directory: epath.Path, result: ShardResult) -> None:
    """Records a shard as complete; written after the shard and its index (see module docstring)."""
    storage.write_text(directory / _MARKER.format(result.name), json.dumps(dataclasses.asdict(result)))


def _is_complete(directory: epath.Path, result: ShardResult, found: dict[str, int]) -> bool:
    """The shard and its index are there at their recorded sizes (a local shard: and its sha256)."""
    if found.get(result.name) != result.num_bytes:
        return False
    if found.get(mf.index_name(result.name)) != records.INDEX_DTYPE.itemsize * (result.num_records + 1):
        return False
    return storage.is_remote(directory) or mf.file_sha256(directory / result.name) == result.sha256


def _result_from_json(data: dict) -> ShardResult:
    tuples = ("class_counts", "sum_mean", "sum_sq")
    fields = {k: tuple(v) if k in tuples else v for k, v in data.items()}
    fields["skipped"] = tuple((reason, item_id) for reason, item_id in data["skipped"])
    return ShardResult(**fields)


def build_manifest(source: Source, options: ConvertOptions, results: list[ShardResult]) -> mf.Manifest:
    """The manifest of every shard's result, in plan order: each split's statistics are summed in
    that order, so any way of writing the shards gives the same floating-point sums."""
    splits = {}
    for split in sorted({r.split for r in results}):
        members = [r for r in results if r.split == split]
        n = sum(r.num_records for r in members)
        sum_mean = np.sum([r.sum_mean for r in members], axis=0)
        sum_sq = np.sum([r.sum_sq for r in members], axis=0)
        mean = sum_mean / max(n, 1)
        std = np.sqrt(np.maximum(sum_sq / max(n, 1) - mean**2, 0.0))
        splits[split] = mf.Split(
            shards=tuple(mf.Shard(r.name, r.num_records, r.sha256, mf.index_name(r.name), r.num_bytes)
                         for r in members),
            num_records=n,
            class_counts=tuple(int(c) for c in np.sum([r.class_counts for r in members], axis=0).reshape(-1)),
            mean=tuple(mean.tolist()),
            std=tuple(std.tolist()),
        )
    return mf.Manifest(
        dataset=options.dataset, modality=source.modality, format=FORMAT,
        label_names=tuple(source.label_names), multi_label=source.multi_label,
        pixel_depth=max(r.pixel_depth for r in results), channels=source.channels,
        feature_spec=records.FEATURE_SPEC, splits=splits, windows=source.windows,
        directory=options.directory if storage.is_remote(options.directory) else options.directory.resolve(),
    )


def report(manifest: mf.Manifest, results: list[ShardResult], reused: int) -> ConversionReport:
    """What a conversion did, from its manifest and every shard's result in plan order."""
    skipped = [s for r in results for s in r.skipped]
    return ConversionReport(
        manifest=manifest,
        written={split: manifest.splits[split].num_records for split in manifest.splits},
        skipped=dict(Counter(reason for reason, _ in skipped)),
        skipped_ids=tuple(item_id for _, item_id in skipped),
        reused_shards=reused,
        total_shards=len(results),
    )


def convert(source: Source, key: bytes, options: ConvertOptions,
            on_shard: Callable[[ShardResult], None] | None = None) -> ConversionReport:
    """Converts a source into options.directory: shards, their indexes, the resume state and,
    last, manifest.json."""
    items = source.items()
    if not items:
        raise ConversionError(f"{source.__class__.__name__}: no inputs found")
    tasks = plan_shards(items, options)
    directory = options.directory
    done = completed(directory, begin(directory, fingerprint(source, tasks, key, options), options.overwrite))
    reused = len(done)
    todo = [t for t in tasks if t.name not in done]
    bar = tqdm(total=len(items), unit="item", desc=options.dataset, disable=not options.progress, file=sys.stderr)
    bar.update(sum(len(t.items) for t in tasks if t.name in done))

    def finish(result: ShardResult) -> None:
        done[result.name] = result
        write_marker(directory, result)
        bar.update(len(next(t for t in tasks if t.name == result.name).items))
        if on_shard is not None:
            on_shard(result)

    try:
        if options.workers <= 1 or len(todo) <= 1:
            for task in todo:
                finish(write_shard(source, key, options, task))
        else:
            # Spawned (not forked) workers: safe beside threads (tqdm, JAX) in the parent. An executor,
            # not a Pool: a worker that dies raises BrokenProcessPool instead of hanging the run.
            with ProcessPoolExecutor(min(options.workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(source, key, options)) as pool:
                futures = [pool.submit(_run_task, task) for task in todo]
                try:
                    for future in as_completed(futures):
                        finish(future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    results = [done[t.name] for t in tasks]
    manifest = build_manifest(source, options, results)
    mf.save_manifest(manifest, directory)
    return report(manifest, results, reused)
