"""TFRecord shards of tf.train.Example without TensorFlow: framing, CRCs, Example schema, image decode.

Why not tf.io: training hosts should not need TensorFlow, and Grain's TFRecord reader does not
check CRCs, so a flipped bit would reach the model as a silently wrong image. Here every record is
checked (CRC32C via google-crc32c, a C extension; a pure-Python CRC is too slow) and the files stay
byte-compatible with tf.data.TFRecordDataset.

Framing of one record (all little endian):
    uint64 length | uint32 masked_crc32c(length bytes) | payload | uint32 masked_crc32c(payload)

Example schema (flat keys so a TFDS FeaturesDict of the same names emits identical Examples):
    image        bytes   encoded PNG (8- or 16-bit) or JPEG
    image_format bytes   "png" | "jpeg"
    height, width, channels  int64
    modality     bytes   one of data_pipelines.modalities.MODALITIES
    labels       int64[] class indices (one for single-label, several or none for multi-label)
    dataset      bytes   dataset name
    image_id     bytes   keyed HMAC of the source path/UID (see privacy.py); identifies nobody

Directory layout and manifest: see manifest.py (`load_manifest` is re-exported here).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cv2
import google_crc32c
import numpy as np
from google.protobuf import message
from tensorflow_datasets.proto import tf_example_pb2

from data_pipelines import storage
from data_pipelines.manifest import load_manifest  # noqa: F401  (re-exported for readers)
from data_pipelines.modalities import MODALITIES

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_HEADER_BYTES = _HEADER.size  # 12
_FOOTER_BYTES = _FOOTER.size  # 4
FRAMING_BYTES = _HEADER_BYTES + _FOOTER_BYTES  # a record's size beyond its payload
_MASK_DELTA = 0xA282EAD8
# A shard's index (manifest.index_name): its records' byte offsets, then its size.
INDEX_DTYPE = np.dtype("<u8")
IMAGE_FORMATS = ("png", "jpeg")

# Feature spec of the Example schema; written into every manifest so readers can check it.
FEATURE_SPEC: dict[str, dict[str, str]] = {
    "image": {"dtype": "bytes", "shape": "()"},
    "image_format": {"dtype": "bytes", "shape": "()"},
    "height": {"dtype": "int64", "shape": "()"},
    "width": {"dtype": "int64", "shape": "()"},
    "channels": {"dtype": "int64", "shape": "()"},
    "modality": {"dtype": "bytes", "shape": "()"},
    "labels": {"dtype": "int64", "shape": "(None,)"},
    "dataset": {"dtype": "bytes", "shape": "()"},
    "image_id": {"dtype": "bytes", "shape": "()"},
}


class CorruptRecordError(ValueError):
    """A record whose framing, CRC or content is bad; names the file and the record's byte offset."""

    def __init__(self, path: str | os.PathLike, offset: int, reason: str):
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.reason = reason
        super().__init__(f"{self.path}: corrupt record at byte offset {self.offset}: {reason}")


class ImageDecodeError(ValueError):
    """Encoded image bytes that do not decode; the message says why (empty, unknown format, corrupt)."""


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (masking keeps CRCs of CRC-bearing data well distributed)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One payload framed as a TFRecord record."""
    length = struct.pack("<Q", len(payload))
    return length + _FOOTER.pack(masked_crc32c(length)) + payload + _FOOTER.pack(masked_crc32c(payload))


class TFRecordWriter:
    """Appends framed records to a local file; use as a context manager. `count` is the records
    written; `extents` their offsets with the file size last, the shard's index (INDEX_DTYPE)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "wb")
        self._extents = [0]

    @property
    def count(self) -> int:
        return len(self._extents) - 1

    @property
    def extents(self) -> np.ndarray:
        return np.asarray(self._extents, INDEX_DTYPE)

    def write(self, payload: bytes) -> None:
        framed = frame_record(payload)
        self._file.write(framed)
        self._extents.append(self._extents[-1] + len(framed))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_tfrecords(path: str | os.PathLike, serialized: Iterable[bytes]) -> int:
    """Writes every payload to a new TFRecord file at `path`; returns the number written."""
    with TFRecordWriter(path) as writer:
        for payload in serialized:
            writer.write(payload)
    return writer.count


def _check_header(path: str, header: bytes, offset: int, remaining: int) -> int:
    """Validates a record header found at file `offset` with `remaining` bytes left; returns its length."""
    if len(header) < _HEADER_BYTES:
        raise CorruptRecordError(path, offset, f"truncated header ({len(header)} of {_HEADER_BYTES} bytes)")
    length, length_crc = _HEADER.unpack(header)
    if masked_crc32c(header[:8]) != length_crc:
        raise CorruptRecordError(path, offset, "length CRC mismatch (not a record start, or corrupt)")
    needed = length + FRAMING_BYTES
    if needed > remaining:
        raise CorruptRecordError(path, offset, f"truncated record (needs {needed} bytes, {remaining} left)")
    return length


def _check_payload(path: str, offset: int, payload: bytes, crc_bytes: bytes) -> bytes:
    if masked_crc32c(payload) != _FOOTER.unpack(crc_bytes)[0]:
        raise CorruptRecordError(path, offset, "payload CRC mismatch")
    return payload


def parse_record(path: str, offset: int, framed: bytes) -> bytes:
    """The CRC-checked payload of one whole framed record read from `path` at `offset` (its extent
    known from the shard's index), which must hold exactly one record."""
    length = _check_header(path, framed[:_HEADER_BYTES], offset, len(framed))
    if length + FRAMING_BYTES != len(framed):
        raise CorruptRecordError(path, offset, f"record of {length + FRAMING_BYTES} bytes where "
                                               f"the shard's index says {len(framed)}")
    return _check_payload(path, offset, framed[_HEADER_BYTES:_HEADER_BYTES + length], framed[-_FOOTER_BYTES:])


@contextlib.contextmanager
def _contents(path: str) -> Iterator[Any]:
    """The whole file as a bytes-like object: mapped locally, one read (through storage) for a
    bucket object, which scanning has to fetch in full anyway."""
    if storage.is_remote(path):
        yield storage.read_bytes(path)
        return
    if os.path.getsize(path) == 0:  # mmap refuses empty files
        yield b""
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yields (byte offset, payload) of every record, checking both CRCs and the framing."""
    path = os.fspath(path)
    with _contents(path) as buf:
        size = len(buf)
        offset = 0
        while offset < size:
            length = _check_header(path, buf[offset:offset + _HEADER_BYTES], offset, size - offset)
            start = offset + _HEADER_BYTES
            payload = bytes(buf[start:start + length])
            yield offset, _check_payload(path, offset, payload, buf[start + length:start + length + _FOOTER_BYTES])
            offset = start + length + _FOOTER_BYTES


def record_extents(path: str | os.PathLike) -> np.ndarray:
    """Byte offsets (INDEX_DTYPE) of every record with the file size last, from one scan of the
    headers (payload CRCs not read): what the shard's index holds, for shards written without one.

    Checks each length CRC and that the last record is complete, so a truncated shard fails here,
    at indexing time, rather than after hours of training. A bucket object is read whole.
    """
    path = os.fspath(path)
    extents = [0]
    with _contents(path) as buf:
        size = len(buf)
        while extents[-1] < size:
            offset = extents[-1]
            length = _check_header(path, buf[offset:offset + _HEADER_BYTES], offset, size - offset)
            extents.append(offset + length + FRAMING_BYTES)
    return np.asarray(extents, INDEX_DTYPE)


def index_records(path: str | os.PathLike) -> np.ndarray:
    """Byte offsets (int64) of every record, from one scan of the headers (see `record_extents`)."""
    return record_extents(path)[:-1].astype(np.int64)


def _read_at(path: str, f: Any, offset: int) -> bytes:
    f.seek(0, os.SEEK_END)
    remaining = f.tell() - offset
    f.seek(offset)
    length = _check_header(path, f.read(_HEADER_BYTES), offset, remaining)
    body = f.read(length + _FOOTER_BYTES)
    return _check_payload(path, offset, body[:length], body[length:])


def read_record_at(path: str | os.PathLike, offset: int) -> bytes:
    """The CRC-checked payload of the record starting at `offset` (from `index_records`); for a
    bucket object, two ranged reads (the header gives the length)."""
    path = os.fspath(path)
    offset = int(offset)
    if storage.is_remote(path):
        header = storage.read_range(path, offset, offset + _HEADER_BYTES)
        length = _check_header(path, header, offset, storage.size(path) - offset)
        return parse_record(path, offset, header + storage.read_range(
            path, offset + _HEADER_BYTES, offset + length + FRAMING_BYTES))
    with open(path, "rb") as f:
        return _read_at(path, f, offset)


class RecordFileReader:
    """Random access to one local TFRecord file, keeping the file open between reads.

    Picklable (the handle is reopened lazily), so it can be shipped to Grain worker processes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file: Any = None

    def read(self, offset: int, size: int | None = None) -> bytes:
        """The record at `offset`; with its framed `size` (from the shard's index) in one read."""
        if self._file is None:
            self._file = open(self.path, "rb")
        if size is None:
            return _read_at(self.path, self._file, int(offset))
        self._file.seek(int(offset))
        return parse_record(self.path, int(offset), self._file.read(int(size)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None}


def _bytes_feature(example: Any, key: str, value: bytes) -> None:
    example.features.feature[key].bytes_list.value.append(value)


def _int_feature(example: Any, key: str, values: Sequence[int]) -> None:
    example.features.feature[key].int64_list.value.extend(int(v) for v in values)


def encode_example(
    *,
    image: bytes,
    image_format: str,
    height: int,
    width: int,
    channels: int,
    modality: str,
    labels: Sequence[int],
    dataset: str,
    image_id: str,
) -> bytes:
    """A serialized tf.train.Example of the shard schema (see module docstring)."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r} not in {IMAGE_FORMATS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    example = tf_example_pb2.Example()
    _bytes_feature(example, "image", image)
    _bytes_feature(example, "image_format", image_format.encode())
    _int_feature(example, "height", [height])
    _int_feature(example, "width", [width])
    _int_feature(example, "channels", [channels])
    _bytes_feature(example, "modality", modality.encode())
    _int_feature(example, "labels", labels)
    _bytes_feature(example, "dataset", dataset.encode())
    _bytes_feature(example, "image_id", image_id.encode())
    return example.SerializeToString(deterministic=True)  # sorted map keys: same bytes in every process


def _feature_values(feature: Any, key: str) -> Sequence[Any]:
    """The values of one feature, checked against FEATURE_SPEC's dtype and shape.

    A writer of another schema (or a damaged payload whose CRC was recomputed) can put any kind and
    count of values under a known key; without this check they surfaced as an IndexError or a
    UnicodeDecodeError that named neither the key nor the problem.
    """
    spec = FEATURE_SPEC[key]
    kind = feature.WhichOneof("kind")
    values = feature.bytes_list.value if spec["dtype"] == "bytes" else feature.int64_list.value
    expected_kind = "bytes_list" if spec["dtype"] == "bytes" else "int64_list"
    if kind not in (expected_kind, None):
        raise ValueError(f"Example feature {key!r} holds {kind.removesuffix('_list')} values; the schema says {spec['dtype']}")
    if spec["shape"] == "()" and len(values) != 1:
        raise ValueError(f"Example feature {key!r} holds {len(values)} values; the schema says exactly one")
    return values


def decode_example(serialized: bytes) -> dict[str, Any]:
    """The fields of a serialized Example of the shard schema.

    Raises ValueError when the bytes are not an Example or a feature has the wrong type or count of
    values (the message starts "Example feature '<key>'"), and KeyError naming a missing feature.
    """
    try:
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
    except message.DecodeError as e:
        raise ValueError(f"record payload is not a tf.train.Example ({e})") from None
    for key in FEATURE_SPEC:
        if key not in feature:
            raise KeyError(f"Example lacks feature {key!r}")
    values = {key: _feature_values(feature[key], key) for key in FEATURE_SPEC}

    def text(key: str) -> str:
        try:
            return values[key][0].decode()
        except UnicodeDecodeError:
            raise ValueError(f"Example feature {key!r} is not UTF-8 text") from None

    return {
        "image": values["image"][0],
        "image_format": text("image_format"),
        "height": int(values["height"][0]),
        "width": int(values["width"][0]),
        "channels": int(values["channels"][0]),
        "modality": text("modality"),
        "labels": np.asarray(values["labels"], np.int64),
        "dataset": text("dataset"),
        "image_id": text("image_id"),
    }


def _sniff_format(encoded: bytes) -> str | None:
    if encoded[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if encoded[:3] == b"\xff\xd8\xff":
        return "jpeg"
    return None


def decode_image_raw(encoded: bytes, source: str | None = None) -> np.ndarray:
    """HxWxC RGB/grey array at the stored depth (uint8 or uint16), alpha dropped; or ImageDecodeError."""
    where = f"{source}: " if source else ""
    if not encoded:
        raise ImageDecodeError(f"{where}image bytes are empty")
    fmt = _sniff_format(encoded)
    if fmt is None:
        raise ImageDecodeError(f"{where}image bytes are neither PNG nor JPEG (starts with {encoded[:8]!r})")
    # libjpeg decodes a truncated JPEG with a grey fill and only a warning: check the end marker.
    if fmt == "jpeg" and not encoded.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageDecodeError(f"{where}JPEG data is truncated (no end-of-image marker)")
    if fmt == "png" and b"IEND" not in encoded[-12:]:
        raise ImageDecodeError(f"{where}PNG data is truncated (no IEND chunk)")
    image = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError(f"{where}{fmt.upper()} data is corrupt ({len(encoded)} bytes did not decode)")
    if image.ndim == 2:
        image = image[:, :, None]
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == image.shape[2]:
        return image
    if channels == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 1 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]
    raise ValueError(f"cannot convert {image.shape[2]} channels to {channels}")


def decode_image(encoded: bytes, *, channels: int = 3, source: str | None = None) -> np.ndarray:
    """uint8 HxWxC RGB (or grey) array of a PNG or JPEG; `source` names the record in errors.

    Grey images are repeated to 3 channels when channels=3. A 16-bit PNG is mapped linearly onto
    0..255 (round(v * 255 / 65535)); use `decode_image16` to keep its full depth.
    """
    image = decode_image_raw(encoded, source)
    if image.dtype == np.uint16:
        image = np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    return _to_channels(image, channels)


def decode_image16(encoded: bytes, *, channels: int = 1, source: str | None = None) -> np.ndarray:
    """uint16 HxWxC array of a PNG at full depth (8-bit inputs are widened, values unchanged)."""
    image = decode_image_raw(encoded, source).astype(np.uint16)
    return _to_channels(image, channels)


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 or uint16 HxW or HxWxC (RGB) array."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {image.shape}")
    return buf.tobytes()
