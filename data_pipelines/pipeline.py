"""Grain training pipeline: modality-balanced multi-crop batches as uint8, resumable exactly.

One Grain element is one host batch, a pure function of its step index: `sampler` says which
modality fills each slot and which position of that modality's infinite stream it takes,
`record_source` maps the position to (file, byte offset), and `augment` renders the crops with a
generator keyed by (seed, host, step, slot). A `grain.MapDataset.range` over steps therefore
makes the iterator state a step counter: saving and restoring it reproduces the uninterrupted
batches, and neither worker processes (which each take every W-th step) nor threads change
batch content.

A batch, per host, with B = local devices x per-device batch, device d owning rows
[d * b, (d + 1) * b) grouped by modality:
    global    uint8 [B, num_global, G, G, 3]
    local     uint8 [B, num_local, L, L, 3]
    modality  int32 [B]   (ids of data_pipelines.modalities)
Images stay uint8 until the train step normalises them on device with the run's pixel statistics
(mermed_jax/training/run_record.py).
`mermed_jax.sharding.to_global` turns the host batches into global jax.Arrays.

Configuration (`TrainConfig`, or `TrainConfig.from_config(config.data)` for an ml_collections
ConfigDict with the same field names; `crops` is a nested section of MultiCropConfig fields;
keyword overrides bring in fields kept elsewhere in the config, such as global_batch and crops):
    dirs              dataset directories: the converter's (manifest.json) or TFDS-prepared ones;
                      local paths or gs:// / s3:// URLs (data_pipelines/storage.py)
    split             split to read, "train" by default
    per_device_batch  images per device batch; or global_batch, divided by jax.device_count()
    crops             MultiCropConfig: sizes, counts, scales, jitter, blur (the paper's defaults)
    seed              one seed for stream shuffles and augmentation
    mixture           {modality name: weight}; "natural": shares proportional to each modality's
                      record count in the split (the data's own mixture, an ablation of balanced
                      batches); default (None) equal shares of the modalities present
    skip_corrupt      False: a bad record raises CorruptRecordError naming file and offset;
                      True: it is logged, replaced by the next record of its stream and counted
                      in TrainIterator.metrics()["skipped_records"]
    worker_count      Grain worker processes (0: read in this process)
    read_threads      threads per process computing batches (OpenCV releases the GIL)
    prefetch          batches buffered per process
    cycle_length      files interleaved at a time in each modality stream
    shuffle_window    window of the per-pass window shuffle, in records
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Mapping, Sequence

import cv2
import grain
import jax
import numpy as np
from absl import flags

from data_pipelines import record_source, records, sampler
from data_pipelines.batch_spec import batch_layout
from data_pipelines.modalities import MODALITIES, modality_id
from data_pipelines.multicrop import keyed_rng, multicrop
from data_pipelines.train_config import NATURAL_MIXTURE, TrainConfig

_AUG_KEY = 2  # key namespace of augmentation generators
_MAX_CONSECUTIVE_SKIPS = 100


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # parallelism comes from processes and Grain's threads


class _BatchMaker:
    """step -> host batch; picklable, so Grain can run it in worker processes."""

    def __init__(self, cfg: TrainConfig, host: dict[int, record_source.HostRecords], weights: np.ndarray,
                 process_index: int, process_count: int, local_devices: int):
        self.cfg = cfg
        self.modalities = np.asarray(sorted(host), np.int32)
        self.host = [host[int(m)] for m in self.modalities]
        self.process_index = process_index
        self.alloc = sampler.BalancedAllocator(cfg.device_batch(), local_devices, process_index,
                                               process_count, weights)
        self.reader = record_source.RecordReader()
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_orders": {}}

    def _order(self, i: int, epoch: int) -> np.ndarray:
        order = self._orders.get((i, epoch))
        if order is None:
            src = self.host[i]
            order = sampler.epoch_order(src.unit_starts, self.cfg.seed, int(self.modalities[i]),
                                        self.process_index, epoch, self.cfg.cycle_length,
                                        self.cfg.shuffle_window)
            self._orders[(i, epoch)] = order
            self._orders.pop((i, epoch - 2), None)
        return order

    def _record(self, i: int, position: int) -> tuple[str, int, int]:
        """(file, byte offset, size) of the record at stream `position` of modality i."""
        src = self.host[i]
        epoch, k = divmod(position, len(src))
        r = self._order(i, epoch)[k]
        return src.files[src.file_ids[r]], int(src.offsets[r]), int(src.sizes[r])

    def _image(self, i: int, position: int, fetched: dict[tuple[str, int], bytes]) -> tuple[np.ndarray, int]:
        """Decoded image at stream `position` of modality i, and how many bad records were skipped."""
        src = self.host[i]
        for skipped in range(min(len(src), _MAX_CONSECUTIVE_SKIPS)):
            path, offset, size = self._record(i, position + skipped)
            try:
                return self.reader.read_image(path, offset, size, fetched)[1], skipped
            except records.CorruptRecordError as e:
                error = e
                if not self.cfg.skip_corrupt:
                    raise
                logging.warning("skipping bad record (skip_corrupt=True): %s", error)
        raise RuntimeError(f"{_MAX_CONSECUTIVE_SKIPS} consecutive records of modality "
                           f"{MODALITIES[self.modalities[i]]} are bad (last: {error})")

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        crops = self.cfg.crops
        counts = self.alloc.device_counts(step)
        position = self.alloc.stream_start(step).copy()
        # The batch's bucket records requested all at once (records that replace skipped ones are
        # read one by one when met).
        fetched = self.reader.fetch([self._record(i, int(position[i]) + j)
                                     for i, total in enumerate(counts.sum(axis=0)) for j in range(int(total))])
        size = int(counts.sum())
        batch = {name: np.empty(shape, dtype) for name, (shape, dtype) in batch_layout(size, crops).items()}
        skipped = 0
        slot = 0
        for device_counts in counts:
            for i, count in enumerate(device_counts):
                for _ in range(count):
                    image, bad = self._image(i, int(position[i]), fetched)
                    skipped += bad
                    position[i] += 1
                    rng = keyed_rng((self.cfg.seed, _AUG_KEY, self.process_index, step, slot))
                    multicrop(image, rng, crops, batch["global"][slot], batch["local"][slot])
                    batch["modality"][slot] = self.modalities[i]
                    slot += 1
        batch["skipped"] = np.int32(skipped)
        return batch


def _weights(cfg: TrainConfig, shards: Mapping[int, Sequence[record_source.ShardFile]]) -> tuple[list[int], np.ndarray]:
    """Active modality ids and their weights; modalities weighted 0 are not read at all."""
    present = list(shards)
    if cfg.mixture is None:
        return present, np.ones(len(present))
    if cfg.mixture == NATURAL_MIXTURE:  # every host lists every shard, so all hosts agree on these
        return present, np.asarray([sum(f.num_records for f in shards[m]) for m in present], np.float64)
    weights = {modality_id(name): float(w) for name, w in cfg.mixture.items()}
    missing = sorted(MODALITIES[m] for m, w in weights.items() if w > 0 and m not in present)
    if missing:
        raise ValueError(f"mixture weights modalities with no {cfg.split!r} data in dirs: {missing}")
    active = [m for m in present if weights.get(m, 0.0) > 0]
    return active, np.asarray([weights[m] for m in active])


def _batch_maker(cfg: TrainConfig, process_index: int | None, process_count: int | None,
                 local_devices: int | None) -> tuple[_BatchMaker, int]:
    """Indexes this host's records; returns the step -> batch function and the records lost to
    damaged shards (skip_corrupt only)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_devices = jax.local_device_count() if local_devices is None else local_devices
    shards = record_source.list_shards(cfg.dirs, cfg.split)
    active, weights = _weights(cfg, shards)
    if not active:
        raise ValueError(f"no {cfg.split!r} shards with positive mixture weight in {list(cfg.dirs)}")
    host = {m: record_source.host_records(shards[m], process_index, process_count, cfg.skip_corrupt)
            for m in active}
    empty = [MODALITIES[m] for m, h in host.items() if len(h) == 0]
    if empty:
        raise ValueError(f"host {process_index} of {process_count} has no records of {empty}")
    maker = _BatchMaker(cfg, host, weights, process_index, process_count, local_devices)
    return maker, sum(h.missing for h in host.values())


def _dataset(cfg: TrainConfig, maker: _BatchMaker, start_step: int) -> grain.IterDataset:
    ds = grain.MapDataset.range(start_step, sys.maxsize).map(maker).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; programs without absl.app never parse them.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.prefetch),
                            worker_init_fn=_worker_init)
    return ds


class TrainIterator(grain.DatasetIterator):
    """Host batches, resumable; a grain DatasetIterator, so grain.checkpoint / Orbax can save it.

    The state is {"step": next step, "skipped_records": count}. A batch is a function of its
    step alone, so the step is all a restore needs, and a job may restore it with a different
    worker_count, read_threads or prefetch. metrics(): skipped_records (bad records met while
    reading, each replaced by the next record of its stream) and unreadable_records (records of
    damaged shards lost at indexing time).
    """

    def __init__(self, cfg: TrainConfig, maker: _BatchMaker, start_step: int = 0, unreadable: int = 0):
        super().__init__()
        self._cfg, self._maker = cfg, maker
        self._step = start_step
        self._skipped = 0
        self._unreadable = unreadable
        self._inner: grain.DatasetIterator | None = None

    def _iterator(self) -> grain.DatasetIterator:
        if self._inner is None:
            self._inner = iter(_dataset(self._cfg, self._maker, self._step))
        return self._inner

    def _release(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._iterator())
        self._step += 1
        self._skipped += int(batch.pop("skipped"))
        return batch

    def metrics(self) -> dict[str, int]:
        return {"skipped_records": self._skipped, "unreadable_records": self._unreadable}

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "skipped_records": self._skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._release()
        self._step = int(state["step"])
        self._skipped = int(state["skipped_records"])

    def start_prefetch(self) -> None:
        self._iterator().start_prefetch()

    def close(self) -> None:
        self._release()
        super().close()


def train_iterator(cfg: TrainConfig, *, start_step: int = 0, process_index: int | None = None,
                   process_count: int | None = None, local_devices: int | None = None) -> TrainIterator:
    """Iterator over host batches from `start_step` on (e.g. a checkpoint's step when the
    checkpoint holds no iterator state); host arguments default to jax's."""
    maker, unreadable = _batch_maker(cfg, process_index, process_count, local_devices)
    return TrainIterator(cfg, maker, start_step, unreadable)
