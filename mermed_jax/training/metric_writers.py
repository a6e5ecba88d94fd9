"""Metric writers: TensorBoard (clu) and a JSON-lines file beside it, on process 0 only; other
processes log nothing. Kept apart from flops.py because clu imports tensorflow."""

import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars as one JSON object per line: easy to read back in tests and notebooks."""

    def __init__(self, path: pathlib.Path):
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def make_writer(workdir: pathlib.Path) -> metric_writers.MetricWriter:
    """TensorBoard + JSON lines (metrics.jsonl) on process 0; logging only elsewhere."""
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(str(workdir), just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(str(workdir), asynchronous=True),
        JsonlWriter(workdir / "metrics.jsonl"),
    ])


def host_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics -> Python floats (the one host sync per log step)."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
