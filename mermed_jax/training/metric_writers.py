"""Metric writers: JSON lines and TensorBoard events in the workdir on process 0, a log line per
write everywhere. Kept apart from flops.py because clu imports tensorflow.

Both go through data_pipelines.storage, so a local workdir and a gs:// one run the same code (a
pretraining workdir cannot be on s3://: pretrain refuses it, as Orbax cannot write there). An
object store has no append, so neither stream grows one file: each is a series of *parts*, whole
objects named by the first step they hold, zero-padded so that names sort by step:

  WORKDIR/metrics/000000000001.jsonl          scalars as one JSON object per line
  WORKDIR/events.out.tfevents.000000000001.mermed   TFRecord-framed Event protos (TensorBoard)

A writer buffers its records and at a flush rewrites its current part whole (every
`log_flush_seconds`, and at close); a part full of PART_RECORDS records is left as it is and the
next flush starts another. A crash loses at most the records since the last flush, and no reader
ever sees half an object. TensorBoard reads event files in name order, so it reads the parts in
step order. tf.summary is not used: it grows one file, through TensorFlow's file layer, which
cannot be pointed at another GCS endpoint (an emulator) and bypasses data_pipelines.storage.

A flush during the run that cannot write (a storage outage that outlasts the storage layer's
retries) logs a warning naming the object and keeps every record it could not write, so the next
flush writes them; training goes on. Only close(), at the end of the job, raises when the records
still cannot be written.

A resumed run logs again from its checkpoint's step on. Its writers start new parts and delete
the parts of the interrupted run that start after that step (nothing in them belongs to the run's
history any more); `read_metrics` drops the interrupted run's records at or after the first step
a later part holds, as TensorBoard purges events when steps go back. A workdir written before
parts existed keeps its appended metrics.jsonl, which read_metrics reads first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers
from tensorboard.compat.proto import event_pb2, summary_pb2

from data_pipelines import storage
from data_pipelines.records import frame_record

METRICS_DIR = "metrics"
JSONL_SUFFIX = ".jsonl"
LEGACY_JSONL = "metrics.jsonl"  # one appended file, as runs wrote it before parts
EVENTS_PREFIX = "events.out.tfevents."
EVENTS_SUFFIX = ".mermed"
STEP_DIGITS = 12
PART_RECORDS = 1000  # records per part: a flush rewrites at most this many (about 0.5 MB of JSON)


def _step_of(name: str, prefix: str, suffix: str) -> int | None:
    """The first step a part's name gives, or None for any other name."""
    digits = name[len(prefix):len(name) - len(suffix)]
    ok = name.startswith(prefix) and name.endswith(suffix) and len(digits) == STEP_DIGITS and digits.isdigit()
    return int(digits) if ok else None


class _Parts:
    """One stream of records kept as part objects `folder/prefix<first step>suffix` (module docstring)."""

    def __init__(self, folder: str, prefix: str, suffix: str, header: Callable[[], bytes],
                 flush_seconds: float, start_step: int):
        self._folder, self._prefix, self._suffix = folder, prefix, suffix
        self._header = header  # what every part begins with
        self._flush_seconds = flush_seconds
        self._unwritten: list[tuple[int, list[bytes]]] = []  # full parts a failed flush could not write
        self._records: list[bytes] = []  # the current part's, flushed or not
        self._first_step: int | None = None
        self._last_step: int | None = None
        self._dirty = False
        self._writing = ""  # the part being written, for the warning when that fails
        self._last_flush = time.monotonic()
        for name in storage.listdir(folder):
            first = _step_of(name, prefix, suffix)
            if first is not None and first > start_step:  # written by a run this one resumes past
                storage.remove(storage.join(folder, name))

    def add(self, step: int, record: bytes) -> None:
        # A full part closes only between steps, so that all records of a step share one part.
        if len(self._records) >= PART_RECORDS and step != self._last_step:
            if self._dirty:  # written by the flush below, or kept for the next one
                self._unwritten.append((self._first_step, self._records))
            self._records, self._first_step, self._dirty = [], None, False
            self.flush()
        if self._first_step is None:
            self._first_step = step
        self._records.append(record)
        self._last_step = step
        self._dirty = True
        if time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def _write(self, first_step: int, records: list[bytes]) -> None:
        self._writing = storage.join(self._folder, f"{self._prefix}{first_step:0{STEP_DIGITS}d}{self._suffix}")
        storage.write_bytes(self._writing, self._header() + b"".join(records))

    def _write_all(self) -> None:
        """Writes the unwritten full parts, then the current one; on an error, what is not written stays."""
        while self._unwritten:
            self._write(*self._unwritten[0])
            self._unwritten.pop(0)
        if self._dirty:
            self._write(self._first_step, self._records)
            self._dirty = False

    def pending(self) -> int:
        """Records not yet written."""
        return sum(len(r) for _, r in self._unwritten) + (len(self._records) if self._dirty else 0)

    def flush(self) -> None:
        """Writes what is buffered; a failure to write is logged, and the next flush tries again."""
        try:
            self._write_all()
        except OSError as e:  # storage.StorageError after its retries, or a local disk's error
            logging.warning("metrics: could not write %s (%s); %d records stay buffered for the next flush",
                            self._writing, storage.first_line(e), self.pending())
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """The last flush: raises if what is buffered still cannot be written."""
        self._write_all()


class _ScalarsWriter(metric_writers.MetricWriter):
    """A writer of scalars alone, into one stream of parts; the other kinds of summary are not
    logged by this project."""

    _parts: _Parts

    def flush(self) -> None:
        self._parts.flush()

    def close(self) -> None:
        self._parts.close()

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

    def write_images(self, step, images):
        del step, images

    def write_videos(self, step, videos):
        del step, videos

    def write_audios(self, step, audios, *, sample_rate):
        del step, audios, sample_rate

    def write_texts(self, step, texts):
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_hparams(self, hparams):
        del hparams


class JsonlWriter(_ScalarsWriter):
    """Scalars as one JSON object per line in WORKDIR/metrics/ parts: read them with read_metrics."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, flush_seconds: float):
        self._parts = _Parts(storage.join(workdir, METRICS_DIR), "", JSONL_SUFFIX, lambda: b"", flush_seconds, start_step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._parts.add(int(step), (json.dumps(record) + "\n").encode("utf-8"))


def _event(**fields: Any) -> bytes:
    return frame_record(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())


class EventWriter(_ScalarsWriter):
    """Scalars as TensorBoard events (simple_value summaries) in WORKDIR/events.out.tfevents.* parts."""

    def __init__(self, workdir: str | os.PathLike, *, start_step: int, flush_seconds: float):
        header = lambda: _event(file_version="brain.Event:2")  # noqa: E731 - what TensorBoard expects first
        self._parts = _Parts(os.fspath(workdir), EVENTS_PREFIX, EVENTS_SUFFIX, header, flush_seconds, start_step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._parts.add(int(step), _event(step=int(step), summary=summary_pb2.Summary(value=values)))


class _AllWriters(metric_writers.MultiWriter):
    """clu's MultiWriter, but close() closes every writer before raising the first one's error."""

    def close(self) -> None:
        errors = []
        for w in self._writers:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - raised below, after the other writers closed
                errors.append(e)
        if errors:
            raise errors[0]


def make_writer(workdir: str | os.PathLike, *, start_step: int, flush_seconds: float) -> metric_writers.MetricWriter:
    """Log lines everywhere; on process 0 also the metric and event parts of the workdir.
    start_step: the step the run starts (or resumes) from; flush_seconds: config.log_flush_seconds."""
    if jax.process_index() > 0:
        return metric_writers.LoggingWriter()
    return _AllWriters([
        metric_writers.LoggingWriter(),
        JsonlWriter(workdir, start_step=start_step, flush_seconds=flush_seconds),
        EventWriter(workdir, start_step=start_step, flush_seconds=flush_seconds),
    ])


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """Every logged record of a run as it stands, in order: the parts (after a metrics.jsonl of an
    older run) concatenated, less the records an interrupted run logged past the checkpoint a later
    start resumed from (at a part's first step, and wherever the steps go back, earlier records at
    or after that step are dropped)."""
    folder = storage.join(workdir, METRICS_DIR)
    parts = [storage.join(folder, n) for n in storage.listdir(folder) if _step_of(n, "", JSONL_SUFFIX) is not None]
    legacy = storage.join(workdir, LEGACY_JSONL)
    kept: list[dict] = []
    for part in ([legacy] if storage.exists(legacy) else []) + parts:
        previous = None
        for number, line in enumerate(storage.read_text(part).splitlines(), 1):
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{part}: line {number} is not a metrics record ({e})") from None
            if previous is None or step < previous:
                kept = [r for r in kept if r["step"] < step]
            kept.append(record)
            previous = step
    return kept


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics -> Python floats (the one host sync per log step)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
