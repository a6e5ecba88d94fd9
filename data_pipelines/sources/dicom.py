"""DICOM files via pydicom: CT to HU windows, other images at their stored depth.

- CT (Modality CT, one sample per pixel): stored value * RescaleSlope + RescaleIntercept = HU,
  then one uint8 channel per window (sources/ct.py).
- Other grey images: MONOCHROME1 is inverted (so bright = dense everywhere); up to 8 bits stored
  are uint8, more are kept as 16-bit PNG at their stored values.
- Palette colour goes through its LUT; RGB/YBR come out as RGB (pydicom converts YBR).
- Multi-frame files give one image per frame (at a stride).
- A CT image without HU (a rendered secondary capture, RGB or 8-bit) is kept as rendered, in the
  dataset's channel count; its channels are then not windows.

Only pixels leave the file. The item key is the SOP Instance UID (hashed into the image id; the
file meta copy when the dataset's is blank; when both are, or the file is unreadable, its path
relative to the folder, so the folder typed as a relative or an absolute path, or copied to a
bucket, gives the same ids);
PatientID groups items into splits in memory; no tag value is written or logged, and errors name
the item by its hashed id only. The folder may be local or a bucket prefix (gs://, s3://; storage.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pydicom
from etils import epath
from pydicom.pixels import apply_color_lut

from data_pipelines import storage
from data_pipelines.manifest import Window
from data_pipelines.sources.base import (
    DEFAULT_CHANNELS,
    Frame,
    Item,
    Source,
    SourceError,
    to_channels,
)
from data_pipelines.sources.ct import apply_windows, check_windows


def list_files(root: epath.Path) -> list[epath.Path]:
    """Every regular file under root except obvious sidecars and DICOMDIR indexes (DICOM often has no suffix)."""
    skip = {".txt", ".json", ".csv", ".md", ".nii", ".gz", ".png", ".jpg", ".jpeg"}
    return [p for p in storage.files_under(root) if p.suffix.lower() not in skip and p.name != "DICOMDIR"]


def _grey(ds: pydicom.Dataset, frame: np.ndarray) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8 * frame.dtype.itemsize))
    frame = frame.astype(np.int64)
    if ds.get("PixelRepresentation", 0) == 1:  # two's complement: offset into the unsigned range
        frame = frame + 2 ** (bits - 1)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        frame = (2**bits - 1) - frame
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.clip(frame, 0, np.iinfo(dtype).max).astype(dtype)


class DicomSource(Source):
    private = True

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        modality: str,
        windows: tuple[Window, ...],
        channels: int | None = None,
        frame_stride: int = 1,
    ):
        self.root = storage.path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a directory")
        self.modality = modality
        self.ct_windows = check_windows(windows)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        self.frame_stride = frame_stride
        # A CT set stores one channel per window; anything else the user's or the modality's count.
        self.windows = windows if modality == "ct" else None
        self.channels = len(windows) if modality == "ct" else (channels or DEFAULT_CHANNELS[modality])

    def items(self) -> list[Item]:
        return [self.item(path) for path in self.units()]

    def units(self) -> list[epath.Path]:
        return list_files(self.root)

    def item(self, unit: epath.Path) -> Item:
        """The item of one file, from its header (a read of the file: the costly part of listing)."""
        relative = unit.relative_to(self.root).as_posix()
        try:
            with unit.open("rb") as f:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "PatientID"])
            # Anonymised files may blank the SOP Instance UID but keep the file meta copy of it.
            uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
            key, group = str(uid or relative), str(ds.get("PatientID") or "") or None
        except Exception:  # noqa: BLE001 - an unreadable file fails again, and is counted, at load
            key, group = relative, None
        return Item(key=key, group=group, ref=unit)

    def load(self, item: Item) -> Iterator[Frame]:
        try:
            with item.ref.open("rb") as f:
                ds = pydicom.dcmread(f)
        except Exception as e:  # noqa: BLE001 - pydicom raises many types for non-DICOM input
            raise SourceError("not a readable DICOM file", type(e).__name__) from None
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise SourceError("DICOM without pixel data")
        try:
            pixels = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - codec errors come in many types
            raise SourceError("DICOM pixel data does not decode", type(e).__name__) from None
        # Everything read from the attributes below may be damaged or non-conformant; any failure is
        # a skippable bad input (SourceError: --skip-bad counts it) named by the exception type
        # only, since the message of e.g. float("<tag value>") would carry a tag value into logs.
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1))
            if pixels.ndim == (2 if samples == 1 else 3):
                pixels = pixels[None]
            # pydicom returns excess frames beyond NumberOfFrames with only a warning.
            if pixels.shape[:3] != (frames, int(ds.Rows), int(ds.Columns)):
                raise ValueError("pixel data shape disagrees with Rows, Columns and NumberOfFrames")
            converted = [(index, self._convert(ds, pixels[index])) for index in range(0, frames, self.frame_stride)]
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged attribute fails in many types
            raise SourceError("DICOM attributes do not describe the pixel data", type(e).__name__) from None
        for index, image in converted:
            yield Frame(pixels=image, suffix=f"#frame{index}" if frames > 1 else "")

    def _convert(self, ds: pydicom.Dataset, frame: np.ndarray) -> np.ndarray:
        samples = int(ds.get("SamplesPerPixel", 1))
        if samples == 1 and ds.get("Modality") == "CT" and self.modality == "ct":
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            return apply_windows(frame.astype(np.float64) * slope + intercept, self.ct_windows)
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            rgb = apply_color_lut(frame, ds)
            if rgb.dtype != np.uint8:  # 16-bit LUT entries
                rgb = (rgb >> 8).astype(np.uint8)
            image = rgb
        elif samples == 3:
            image = frame.astype(np.uint8) if frame.dtype != np.uint16 else frame
        else:
            image = _grey(ds, frame)
        if self.modality == "ct":  # a rendered (non-HU) CT image, e.g. a secondary capture: kept as rendered
            image = image if image.dtype == np.uint8 else (image >> 8).astype(np.uint8)
        return to_channels(image, self.channels)
