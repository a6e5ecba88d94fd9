"""What every source reader provides to the converter: a list of items, and pixels per item.

An item is one source unit (an image file, a DICOM file, a NIfTI volume, one entry of an npz);
loading it gives one or more frames (a multi-frame DICOM, axial slices of a volume). Items carry
the source path or UID only as `key`, which the converter turns into a keyed HMAC image id and
never writes or logs; `group` (a patient id) is used in memory to keep a patient in one split.
Sources are pickled to worker processes, so they hold configuration, not open files.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from data_pipelines.manifest import Window

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}

# Stored channels when a user does not choose: grey modalities keep one channel (no 3x bytes),
# colour modalities three. CT from HU sources has one channel per window instead.
DEFAULT_CHANNELS = {"ct": 1, "cxr": 1, "us": 1, "oct": 1, "path": 3, "cfp": 3, "derm": 3}


class SourceError(Exception):
    """An input that cannot become an image. `reason` is a short category, free of data values."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # source path or UID: hashed into image ids; never written or logged
    labels: tuple[int, ...] = ()
    split: str | None = None
    group: str | None = None  # patient id: only for grouping into splits, never written
    ref: Any = None  # what the source's load() needs (a path, an array index, ...)


@dataclasses.dataclass(frozen=True)
class Frame:
    """One image of an item. `encoded` (PNG/JPEG bytes) is stored as is when given: lossless pass-through."""

    pixels: np.ndarray  # HxWxC uint8 or uint16, the stored channel count
    suffix: str = ""  # appended to the item key for the image id ("#frame3", "#z12")
    encoded: bytes | None = None
    image_format: str = "png"


class Source(abc.ABC):
    """A source kind. Subclasses set the attributes in __init__ and implement items() and load()."""

    modality: str
    label_names: tuple[str, ...] = ()
    multi_label: bool = False
    channels: int = 1
    windows: tuple[Window, ...] | None = None
    # True where keys are UIDs or file names that may identify a patient (DICOM, NIfTI): errors
    # then name the item by its hashed id only.
    private: bool = False

    @abc.abstractmethod
    def items(self) -> list[Item]:
        """All items, in a deterministic order."""

    def units(self) -> list[Any]:
        """What a distributed listing enumerates in one place, in items()' order, before workers turn
        each into its item with `item`. By default the items themselves, for sources whose listing
        reads no input file; a source that reads each input to list it (DICOM headers) lists paths
        here, so the reads are spread."""
        return self.items()

    def item(self, unit: Any) -> Item:
        """The item of one of `units()` (see there)."""
        return unit

    @abc.abstractmethod
    def load(self, item: Item) -> Iterator[Frame]:
        """The frames of one item; raises SourceError for input that cannot become an image."""


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC (or HxW) image with `channels` channels: RGB to grey (luma), grey repeated to any count."""
    if image.ndim == 2:
        image = image[:, :, None]
    have = image.shape[2]
    if have == channels:
        return image
    if have not in (1, 3):
        raise SourceError("unsupported channel count", f"{have} channels cannot become {channels}")
    grey = image if have == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.repeat(grey, channels, axis=2)
