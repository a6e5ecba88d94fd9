"""Fuzzed readers: every input gives a correct result or the project's own clear error.

Targets: TFRecord framing (records.iter_records / index_records / read_record_at), the Example
decoder, the PNG/JPEG decoders, the DICOM and NIfTI sources as the converter calls them, and the
params loaders (safetensors, msgpack). Inputs are random bytes and damaged valid files
(tests/fuzzing.py). "Correct" is checked where the format allows it: a damaged TFRecord shard
yields only records that were written, a damaged PNG decodes to the original pixels or not at all
(PNG chunks carry CRCs, zlib an Adler-32). Formats without checksums (JPEG entropy data,
safetensors and msgpack payloads, DICOM pixel data) can only be held to well-formed output.
Budgets: tests/fuzzing.py; `make fuzz` runs them longer.
"""

from __future__ import annotations

import io
import pathlib
import struct

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from fuzzing import budget, damaged
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from tensorflow_datasets.proto import tf_example_pb2
from test_convert_dicom import make_dicom

from data_pipelines import records
from data_pipelines.manifest import Window
from data_pipelines.records import CorruptRecordError, ImageDecodeError
from data_pipelines.shard_writer import _load
from data_pipelines.sources.base import SourceError
from data_pipelines.sources.dicom import DicomSource
from data_pipelines.sources.nifti import NiftiSource
from mermed_jax.interop import files
from mermed_jax.interop.files import CheckpointError
from mermed_jax.interop.importer import load_weights
from mermed_jax.interop.trees import backbone_shapes, unflatten
from mermed_jax.interop.weight_export import export_params
from mermed_jax.models.vit import ViTConfig

pytestmark = pytest.mark.fuzz

WINDOWS = (Window("abdomen", 40, 400), Window("lung", -600, 1500), Window("bone", 400, 1800))
PAYLOADS = [bytes([i]) * (5 + 7 * i) for i in range(6)]
TINY = ViTConfig(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, img_size=8, precision="float32")


def _scratch(tmp_path_factory, name: str) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz") / name


# --------------------------------------------------------------------------- TFRecord framing

def _framed() -> bytes:
    return b"".join(records.frame_record(p) for p in PAYLOADS)


@budget(120)
@given(data=st.one_of(st.binary(max_size=300), damaged(_framed())))
def test_tfrecord_reader_yields_written_records_or_names_the_damage(tmp_path_factory, data):
    path = _scratch(tmp_path_factory, "shard.tfrecord")
    path.write_bytes(data)
    try:
        found = list(records.iter_records(path))
    except CorruptRecordError as e:
        assert e.path == str(path) and 0 <= e.offset < len(data)
        with pytest.raises(CorruptRecordError):  # the header scan of indexing or the CRC of the read
            for offset in records.index_records(path):
                records.read_record_at(path, offset)
        return
    assert all(payload in PAYLOADS for _, payload in found)  # never a record nobody wrote
    offsets = records.index_records(path)
    assert offsets.tolist() == [offset for offset, _ in found]
    assert [records.read_record_at(path, o) for o in offsets] == [p for _, p in found]


@budget(40)
@given(length=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_a_huge_length_with_a_valid_crc_is_refused_without_allocating(tmp_path_factory, length, tail):
    """A length field that passes its CRC but points past the end must not make the reader allocate it."""
    header = struct.pack("<Q", length)
    path = _scratch(tmp_path_factory, "huge.tfrecord")
    path.write_bytes(header + struct.pack("<I", records.masked_crc32c(header)) + tail)
    if length + 16 <= len(tail) + 12:
        return  # a genuine (small) record; covered above
    with pytest.raises(CorruptRecordError, match="truncated record"):
        list(records.iter_records(path))
    with pytest.raises(CorruptRecordError, match="truncated record"):
        records.index_records(path)


# --------------------------------------------------------------------------- Example decoder

def _valid_example() -> bytes:
    return records.encode_example(
        image=records.encode_png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)), image_format="png",
        height=4, width=4, channels=3, modality="ct", labels=[1, 2], dataset="d", image_id="0" * 32,
    )


_FEATURE_VALUES = st.one_of(
    st.tuples(st.just("bytes"), st.lists(st.binary(max_size=8), max_size=2)),
    st.tuples(st.just("int64"), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2)),
    st.tuples(st.just("float"), st.lists(st.floats(width=32), max_size=2)),
    st.tuples(st.just("none"), st.just([])),
)


@st.composite
def _examples(draw: st.DrawFn) -> bytes:
    """Examples whose schema keys hold any kind and count of values (a writer of another schema)."""
    example = tf_example_pb2.Example.FromString(_valid_example())
    for key in draw(st.lists(st.sampled_from(sorted(records.FEATURE_SPEC)), max_size=4, unique=True)):
        kind, values = draw(_FEATURE_VALUES)
        feature = example.features.feature[key]
        feature.Clear()
        if kind == "bytes":
            feature.bytes_list.value.extend(values)
        elif kind == "int64":
            feature.int64_list.value.extend(values)
        elif kind == "float":
            feature.float_list.value.extend(values)
    return example.SerializeToString()


_TYPES = {"image": bytes, "image_format": str, "height": int, "width": int, "channels": int,
          "modality": str, "dataset": str, "image_id": str}


@budget(200)
@given(serialized=st.one_of(st.binary(max_size=200), damaged(_valid_example()), _examples()))
def test_example_decoder_returns_the_schema_or_names_the_feature(serialized):
    try:
        example = records.decode_example(serialized)
    except KeyError as e:
        assert "Example lacks feature" in str(e)
        return
    except ValueError as e:
        message = str(e)
        assert message.startswith("record payload is not a tf.train.Example") or message.startswith("Example feature '")
        return
    assert set(example) == set(records.FEATURE_SPEC)
    for key, kind in _TYPES.items():
        assert type(example[key]) is kind, key
    assert example["labels"].dtype == np.int64 and example["labels"].ndim == 1


# --------------------------------------------------------------------------- image decoders

_PIXELS = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
_PNG = records.encode_png(_PIXELS)
_PNG16 = records.encode_png(np.random.default_rng(1).integers(0, 65536, (9, 7), dtype=np.uint16))
_JPEG = cv2.imencode(".jpg", _PIXELS[:, :, ::-1])[1].tobytes()


@budget(200)
@given(encoded=damaged(_PNG))
def test_damaged_png_decodes_to_the_original_pixels_or_fails_clearly(encoded):
    try:
        image = records.decode_image(encoded, source="shard-7 @ 120")
    except ImageDecodeError as e:
        assert str(e).startswith("shard-7 @ 120: ")
        return
    np.testing.assert_array_equal(image, _PIXELS)  # CRC and Adler-32: no silently different pixels


@budget(120)
@given(encoded=st.one_of(damaged(_JPEG), damaged(_PNG16), st.binary(max_size=64)))
def test_any_image_bytes_decode_to_a_well_formed_array_or_fail_clearly(encoded):
    try:
        image = records.decode_image(encoded, channels=3)
    except ImageDecodeError:
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0


# --------------------------------------------------------------------------- DICOM and NIfTI sources

def _dicom_bytes(tmp_path_factory) -> bytes:
    path = _scratch(tmp_path_factory, "ct.dcm")
    make_dicom(path, np.random.default_rng(2).integers(-1000, 2000, (6, 5), dtype=np.int16))
    return path.read_bytes()


_TAG_VALUES = {  # values a damaged or non-conformant file may hold, as the bytes of the element
    "RescaleSlope": st.sampled_from(["abc", "", "0", "-1", "1e308", "nan", "inf"]),
    "RescaleIntercept": st.sampled_from(["x", "-1e308", "nan", "1e308"]),
    "BitsStored": st.integers(0, 70),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
    "Rows": st.integers(0, 65535), "Columns": st.integers(0, 65535),
    "SamplesPerPixel": st.integers(0, 5),
    "PixelRepresentation": st.integers(0, 3),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "-3", "x", "1000000"]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "HSV", ""]),
    "Modality": st.sampled_from(["CT", "MR", "US", ""]),
}


def _retagged(original: bytes, changes: dict) -> bytes:
    """`original` with elements replaced by raw bytes (pydicom would refuse to set most of these)."""
    ds = pydicom.dcmread(io.BytesIO(original))
    for name, value in changes.items():
        tag = pydicom.datadict.tag_for_keyword(name)
        vr = pydicom.datadict.dictionary_VR(tag)
        raw = struct.pack("<H", value) if vr == "US" else str(value).encode()
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def dicom_bytes(tmp_path_factory) -> bytes:
    return _dicom_bytes(tmp_path_factory)


@budget(120, slow_inputs=True)
@given(data=st.data(), modality=st.sampled_from(["ct", "us"]))
def test_damaged_dicom_gives_frames_or_a_skippable_source_error(tmp_path_factory, dicom_bytes, data, modality):
    """What the converter sees (`shard_writer._load`): well-formed frames, or a SourceError that
    --skip-bad counts; never an unexpected error that stops a conversion of thousands of files."""
    if data.draw(st.booleans()):
        changes = data.draw(st.dictionaries(st.sampled_from(sorted(_TAG_VALUES)), st.none(), min_size=1, max_size=3))
        changes = {k: data.draw(_TAG_VALUES[k]) for k in changes}
        content = _retagged(dicom_bytes, changes)
    else:
        content = data.draw(damaged(dicom_bytes))
    folder = tmp_path_factory.mktemp("dicom")
    (folder / "f.dcm").write_bytes(content)
    source = DicomSource(folder, modality=modality, windows=WINDOWS)
    for frame in _frames_unless_skipped(source):
        assert frame.pixels.ndim == 3 and frame.pixels.shape[2] == source.channels
        assert frame.pixels.dtype in (np.uint8, np.uint16)


def _frames_unless_skipped(source) -> list:
    """The frames of the source's one item as the converter loads them; none when it raises the
    SourceError that --skip-bad counts (any other exception fails the test)."""
    (item,) = source.items()
    try:
        return _load(source, item, "id-1")
    except SourceError:
        return []


def _nifti_bytes(volume: np.ndarray) -> bytes:
    image = nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0]))
    return image.to_bytes()


_VOLUME = np.random.default_rng(3).integers(-1000, 2000, (5, 4, 3)).astype(np.int16)


@budget(120, slow_inputs=True)
@given(content=st.one_of(damaged(_nifti_bytes(_VOLUME)), damaged(_nifti_bytes(_VOLUME.astype(np.float32)), max_edits=1)))
def test_damaged_nifti_gives_slices_or_a_skippable_source_error(tmp_path_factory, content):
    path = _scratch(tmp_path_factory, "vol.nii")
    path.write_bytes(content)
    source = NiftiSource(path, windows=WINDOWS)
    for frame in _frames_unless_skipped(source):
        assert frame.pixels.dtype == np.uint8 and frame.pixels.ndim == 3 and frame.pixels.shape[2] == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_hu_is_refused_not_cast_to_black(tmp_path, bad):
    """NaN (masked voxels) or inf cast to uint8 is undefined and came out as 0: a silent black pixel."""
    volume = _VOLUME.astype(np.float32)
    volume[2, 1, 0] = bad
    path = tmp_path / "vol.nii"
    path.write_bytes(_nifti_bytes(volume))
    source = NiftiSource(path, windows=WINDOWS)
    with pytest.raises(SourceError, match="non-finite HU"):
        _load(source, source.items()[0], "id-1")


# --------------------------------------------------------------------------- params loaders

def _tiny_weights(tmp_path_factory, fmt: str) -> bytes:
    rng = np.random.default_rng(4)
    params = unflatten({p: rng.normal(size=s).astype(np.float32) for p, s in backbone_shapes(TINY).items()})
    path = _scratch(tmp_path_factory, f"w.{fmt}")
    export_params(params, None, TINY, path, fmt)
    return path.read_bytes()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, bytes]:
    return {fmt: _tiny_weights(tmp_path_factory, fmt) for fmt in ("safetensors", "msgpack")}


@budget(150)
@given(data=st.data(), fmt=st.sampled_from(["safetensors", "msgpack"]))
def test_damaged_weight_files_load_or_fail_naming_the_file(tmp_path_factory, weight_files, data, fmt):
    content = data.draw(st.one_of(damaged(weight_files[fmt]), st.binary(max_size=64)))
    path = _scratch(tmp_path_factory, f"weights.{fmt}")
    path.write_bytes(content)
    try:
        weights = load_weights(path, TINY)
    except CheckpointError as e:
        assert str(e).startswith(str(path))
        return
    for path_, value in weights.backbone.items():
        assert value.dtype == np.float32 and value.shape == backbone_shapes(TINY)[path_]


_LEAVES = st.one_of(st.integers(-5, 5), st.text(max_size=4), st.binary(max_size=4), st.none(), st.booleans(),
                    st.floats(allow_nan=False), st.builds(lambda n: np.zeros(n, np.float32), st.integers(0, 3)),
                    st.builds(lambda n: np.array(["a"] * n), st.integers(1, 2)))
_TREES = st.recursive(_LEAVES, lambda children: st.one_of(
    st.lists(children, max_size=3), st.dictionaries(st.sampled_from(
        ["backbone", "head", "blocks", "blocks_0", "block", "patch_embed", "pos_embed", "cls_token", "kernel",
         "teacher_params", "norm1", "scale", "x"]), children, max_size=4)), max_leaves=12)


@budget(150)
@given(tree=st.dictionaries(st.sampled_from(["backbone", "teacher_params", "patch_embed", "blocks", "x"]), _TREES,
                            min_size=1, max_size=3))
def test_msgpack_of_any_structure_loads_or_fails_naming_the_file(tmp_path_factory, tree):
    """A msgpack of the wrong structure (another program's, or ours of another version)."""
    path = _scratch(tmp_path_factory, "tree.msgpack")
    files.write_msgpack(path, tree)
    try:
        load_weights(path, TINY)
    except CheckpointError as e:
        assert str(e).startswith(str(path))
