"""NumPy .npz archives (cached features, test scores) at any location, through data_pipelines.storage.

np.savez and np.load take local paths; these go through bytes, so an evaluation directory can be a
bucket and a written archive is never seen half-written (storage.write_bytes).
"""

from __future__ import annotations

import io
import os

import numpy as np

from data_pipelines import storage


def save(location: str | os.PathLike, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(location, buffer.getvalue())


def load(location: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the archive, read at once (these archives are small)."""
    with np.load(io.BytesIO(storage.read_bytes(location))) as archive:
        return {name: archive[name] for name in archive.files}
