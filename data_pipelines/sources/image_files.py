"""Reading PNG/JPEG files: decode to check and measure them, keep the original bytes when possible.

Original bytes are kept (no re-encode) when they already are what a shard stores: a JPEG, or an
8/16-bit grey or RGB PNG, with the wanted channel count. That is exact and avoids a second JPEG
generation loss; anything else (palette, alpha, other formats, channel changes) becomes a PNG.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import records, storage
from data_pipelines.sources.base import Frame, SourceError, to_channels

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PNG_GREY, _PNG_RGB = 0, 2  # PNG IHDR colour types stored as they are


def _keeps_bytes(encoded: bytes, pixels: np.ndarray, channels: int) -> str | None:
    """The image format when `encoded` can be stored unchanged, else None."""
    if pixels.shape[2] != channels:
        return None
    if encoded[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if encoded[:8] == b"\x89PNG\r\n\x1a\n" and encoded[25] in (_PNG_GREY, _PNG_RGB):
        return "png"
    return None


def decode_file_bytes(encoded: bytes, channels: int) -> Frame:
    """A frame from encoded image bytes; SourceError("undecodable image") when they do not decode."""
    try:
        pixels = records.decode_image_raw(encoded)
    except records.ImageDecodeError as e:
        raise SourceError("undecodable image", str(e)) from None
    fmt = _keeps_bytes(encoded, pixels, channels)
    if fmt is not None:
        return Frame(pixels=pixels, encoded=encoded, image_format=fmt)
    return Frame(pixels=to_channels(pixels, channels))


def load_image_file(path: str | os.PathLike, channels: int) -> Frame:
    """The frame of an image file, local or a bucket object."""
    try:
        encoded = storage.read_bytes(path)
    except OSError as e:
        raise SourceError("unreadable file", type(e).__name__) from None
    return decode_file_bytes(encoded, channels)
