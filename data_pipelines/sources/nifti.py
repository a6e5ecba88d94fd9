"""NIfTI CT volumes via nibabel: axial slices at a stride, several HU windows as channels.

Volumes are reoriented to RAS (nibabel's closest canonical) and each axial slice is laid out the
radiological way DICOM axial images are: rows run anterior to posterior, columns from the
patient's right to left. So a NIfTI and a DICOM series of one volume give the same slice images.
Values are HU after the header's scl_slope/scl_inter (nibabel applies them). Volumes may be local
or in a bucket (gs://, s3://; see storage.py); an item's key is its resolved path or its URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import nibabel as nib
import numpy as np

from data_pipelines import storage
from data_pipelines.manifest import Window
from data_pipelines.sources.base import Frame, Item, Source, SourceError
from data_pipelines.sources.ct import apply_windows, check_windows


def radiological_slice(volume_ras: np.ndarray, k: int) -> np.ndarray:
    """Axial slice k of a RAS volume as an image: image[r, c] = volume[X-1-c, Y-1-r, k]."""
    return volume_ras[::-1, ::-1, k].T


class NiftiSource(Source):
    private = True

    def __init__(self, root: str | os.PathLike, *, windows: tuple[Window, ...], slice_stride: int = 1,
                 modality: str = "ct"):
        self.root = storage.path(root)
        self.modality = modality
        self.windows = check_windows(windows)
        self.channels = len(windows)
        if slice_stride < 1:
            raise ValueError(f"slice_stride must be >= 1, got {slice_stride}")
        self.slice_stride = slice_stride

    def items(self) -> list[Item]:
        if self.root.is_file():
            paths = [self.root]
        else:
            paths = [p for p in storage.files_under(self.root) if p.name.endswith((".nii", ".nii.gz"))]
        return [Item(key=str(p) if storage.is_remote(p) else str(p.resolve()), ref=p) for p in paths]

    def load(self, item: Item) -> Iterator[Frame]:
        try:
            with storage.local_file(item.ref) as local:
                image = nib.as_closest_canonical(nib.load(local))
                volume = np.asarray(image.get_fdata(dtype=np.float64))
        except Exception as e:  # noqa: BLE001 - nibabel raises many types for bad files
            raise SourceError("not a readable NIfTI volume", type(e).__name__) from None
        if volume.ndim == 4 and volume.shape[3] == 1:
            volume = volume[..., 0]
        if volume.ndim != 3:
            raise SourceError("NIfTI is not a 3D volume", f"{volume.ndim} dimensions")
        for k in range(0, volume.shape[2], self.slice_stride):
            yield Frame(pixels=apply_windows(radiological_slice(volume, k), self.windows), suffix=f"#z{k}")
