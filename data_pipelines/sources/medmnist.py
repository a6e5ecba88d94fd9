"""MedMNIST npz files (any 2D flag and size): {train,val,test}_{images,labels} arrays.

Files that hold only some splits (e.g. a train-only subset) keep what they have; the converter
then makes the missing splits. Arrays are loaded once per worker process, per split. The file may
be local or in a bucket (gs://, s3://; see storage.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_pipelines import storage
from data_pipelines.sources.base import Frame, Item, Source
from data_pipelines.sources.medmnist_info import (
    SPLITS,
    Flag,
    flag_of,
    labels_to_indices,
)


class MedMnistSource(Source):
    def __init__(self, npz_path: str | os.PathLike, *, flag: Flag | None = None, modality: str | None = None):
        self.npz_path = storage.path(npz_path)
        self.flag = flag or flag_of(self.npz_path)
        self.modality = modality or self.flag.modality
        self.label_names = self.flag.label_names
        self.multi_label = self.flag.multi_label
        with self._npz() as npz:
            self._splits = [s for s in SPLITS if f"{s}_images" in npz.files]
            if not self._splits:
                raise ValueError(f"{self.npz_path}: no <split>_images arrays; has {npz.files}")
            first = npz[f"{self._splits[0]}_images"]
        self.channels = 1 if first.ndim == 3 else first.shape[3]
        self._arrays: dict[str, np.ndarray] = {}

    @contextlib.contextmanager
    def _npz(self) -> Iterator[Any]:
        """The open npz (a zip read lazily, array by array, from the local file or bucket object)."""
        with self.npz_path.open("rb") as f, np.load(f) as npz:
            yield npz

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}}

    def items(self) -> list[Item]:
        items = []
        with self._npz() as npz:
            for split in self._splits:
                labels = npz[f"{split}_labels"].reshape(len(npz[f"{split}_images"]), -1)
                # With a split of its own, a file's split is kept; a train-only file is re-split.
                keep = split if len(self._splits) > 1 else None
                for i, row in enumerate(labels):
                    items.append(Item(
                        key=f"{self.npz_path.name}/{split}/{i}", labels=labels_to_indices(row, self.multi_label),
                        split=keep, ref=(split, i),
                    ))
        return items

    def _images(self, split: str) -> np.ndarray:
        if split not in self._arrays:
            with self._npz() as npz:
                self._arrays[split] = npz[f"{split}_images"]
        return self._arrays[split]

    def load(self, item: Item) -> Iterator[Frame]:
        split, i = item.ref
        image = self._images(split)[i]
        yield Frame(pixels=image[:, :, None] if image.ndim == 2 else image)
