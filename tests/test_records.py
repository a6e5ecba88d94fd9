"""TFRecord framing, CRC checks, Example schema and image decoding (data_pipelines/records.py)."""

import json
import struct

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines import records
from data_pipelines.records import CorruptRecordError, ImageDecodeError


def _payloads(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.bytes(int(rng.integers(0, 300))) for _ in range(n)]


def test_crc32c_matches_known_vector():
    # RFC 3720 B.4: CRC32C of 32 zero bytes is 0x8A9136AA.
    import google_crc32c

    assert google_crc32c.value(bytes(32)) == 0x8A9136AA
    crc = 0x8A9136AA
    assert records.masked_crc32c(bytes(32)) == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_round_trip_offsets_and_random_access(tmp_path):
    path = tmp_path / "a.tfrecord"
    payloads = _payloads(50)
    assert records.write_tfrecords(path, payloads) == 50
    read = list(records.iter_records(path))
    assert [p for _, p in read] == payloads
    offsets = records.index_records(path)
    assert offsets.dtype == np.int64
    # Offsets computed independently from the framing: 12-byte header + payload + 4-byte CRC.
    expected = np.cumsum([0] + [16 + len(p) for p in payloads[:-1]])
    np.testing.assert_array_equal(offsets, expected)
    np.testing.assert_array_equal(offsets, [o for o, _ in read])
    reader = records.RecordFileReader(path)
    for i in (0, 17, 49):
        assert records.read_record_at(path, offsets[i]) == payloads[i]
        assert reader.read(offsets[i]) == payloads[i]


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.tfrecord"
    assert records.write_tfrecords(path, []) == 0
    assert list(records.iter_records(path)) == []
    assert records.index_records(path).shape == (0,)


def test_readable_by_tf_data(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "a.tfrecord"
    payloads = _payloads(20)
    records.write_tfrecords(path, payloads)
    assert [t.numpy() for t in tf.data.TFRecordDataset(str(path))] == payloads


def test_reads_tf_written_file(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = tmp_path / "tf.tfrecord"
    payloads = _payloads(20)
    with tf.io.TFRecordWriter(str(path)) as w:
        for p in payloads:
            w.write(p)
    assert [p for _, p in records.iter_records(path)] == payloads


def test_bad_payload_crc_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.tfrecord"
    payloads = [b"a" * 10, b"b" * 20, b"c" * 30]
    records.write_tfrecords(path, payloads)
    data = bytearray(path.read_bytes())
    second = 16 + 10
    data[second + 12 + 5] ^= 0x01  # one bit of the second payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError) as e:
        list(records.iter_records(path))
    assert e.value.offset == second and e.value.path == str(path)
    assert str(path) in str(e.value) and f"offset {second}" in str(e.value) and "payload CRC" in str(e.value)
    with pytest.raises(CorruptRecordError, match="payload CRC"):
        records.read_record_at(path, second)
    assert records.read_record_at(path, 0) == payloads[0]


def test_bad_length_crc(tmp_path):
    path = tmp_path / "bad.tfrecord"
    records.write_tfrecords(path, [b"x" * 8, b"y" * 8])
    data = bytearray(path.read_bytes())
    data[24] ^= 0x80  # second record's length field
    path.write_bytes(bytes(data))
    for fn in (lambda: list(records.iter_records(path)), lambda: records.index_records(path)):
        with pytest.raises(CorruptRecordError, match="length CRC") as e:
            fn()
        assert e.value.offset == 24


@pytest.mark.parametrize("cut", [1, 5, 14])
def test_truncated_shard(tmp_path, cut):
    path = tmp_path / "cut.tfrecord"
    records.write_tfrecords(path, [b"p" * 40, b"q" * 40])
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    for fn in (lambda: list(records.iter_records(path)), lambda: records.index_records(path)):
        with pytest.raises(CorruptRecordError, match="truncated") as e:
            fn()
        assert e.value.offset == 56 and str(path) in str(e.value)
    with pytest.raises(CorruptRecordError, match="truncated"):
        records.read_record_at(path, 56)


def test_truncated_header(tmp_path):
    path = tmp_path / "cut.tfrecord"
    records.write_tfrecords(path, [b"p" * 4, b"q" * 4])
    path.write_bytes(path.read_bytes()[: 20 + 6])
    with pytest.raises(CorruptRecordError, match="truncated header") as e:
        records.index_records(path)
    assert e.value.offset == 20


def test_example_round_trip_and_tf_parse():
    image = records.encode_png(np.zeros((4, 5, 3), np.uint8))
    fields = dict(
        image=image, image_format="png", height=4, width=5, channels=3, modality="cxr",
        labels=[2, 7], dataset="nih", image_id="abc",
    )
    serialized = records.encode_example(**fields)
    out = records.decode_example(serialized)
    assert out.keys() == records.FEATURE_SPEC.keys()
    np.testing.assert_array_equal(out.pop("labels"), [2, 7])
    assert out == {k: v for k, v in fields.items() if k != "labels"}
    tf = pytest.importorskip("tensorflow")
    parsed = tf.io.parse_single_example(
        serialized,
        {"image": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64),
         "height": tf.io.FixedLenFeature([], tf.int64), "modality": tf.io.FixedLenFeature([], tf.string)},
    )
    assert parsed["image"].numpy() == image and int(parsed["height"]) == 4
    assert parsed["modality"].numpy() == b"cxr"
    assert list(tf.sparse.to_dense(parsed["labels"]).numpy()) == [2, 7]


def test_example_rejects_unknown_modality_and_format():
    kw = dict(image=b"", height=1, width=1, channels=1, labels=[], dataset="d", image_id="i")
    with pytest.raises(ValueError, match="modality"):
        records.encode_example(image_format="png", modality="mri", **kw)
    with pytest.raises(ValueError, match="image_format"):
        records.encode_example(image_format="gif", modality="ct", **kw)


def test_decode_example_names_missing_key_and_rejects_non_examples():
    from tensorflow_datasets.proto import tf_example_pb2

    with pytest.raises(KeyError, match="image"):
        records.decode_example(tf_example_pb2.Example().SerializeToString())
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        records.decode_example(b"\xff\xff\xff garbage")


def test_decode_image_png_rgb_grey_and_16bit():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(records.decode_image(records.encode_png(rgb)), rgb)
    # Independent check of the channel order: OpenCV writes BGR, so encode through OpenCV ourselves.
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])
    np.testing.assert_array_equal(records.decode_image(buf.tobytes()), rgb)
    grey = rng.integers(0, 256, (6, 4), dtype=np.uint8)
    out = records.decode_image(records.encode_png(grey))
    assert out.shape == (6, 4, 3) and all((out[:, :, c] == grey).all() for c in range(3))
    assert records.decode_image(records.encode_png(grey), channels=1).shape == (6, 4, 1)
    deep = rng.integers(0, 65536, (5, 5), dtype=np.uint16)
    np.testing.assert_array_equal(records.decode_image16(records.encode_png(deep))[:, :, 0], deep)
    eight = records.decode_image(records.encode_png(deep), channels=1)[:, :, 0]
    np.testing.assert_array_equal(eight, np.round(deep / 65535 * 255).astype(np.uint8))


def test_decode_image_jpeg():
    img = np.full((16, 16, 3), (200, 30, 90), np.uint8)
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = records.decode_image(buf.tobytes())
    assert np.abs(out.astype(int) - img).max() <= 3


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"GIF89a....", "neither PNG nor JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND\xaeB`\x82", "corrupt"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "truncated"),
    ],
)
def test_undecodable_image_bytes(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as e:
        records.decode_image(data, source="shard-3.tfrecord@1234")
    assert "shard-3.tfrecord@1234" in str(e.value)


def test_truncated_png():
    png = records.encode_png(np.zeros((32, 32), np.uint8))
    with pytest.raises(ImageDecodeError, match="truncated"):
        records.decode_image(png[: len(png) // 2])


def test_reader_pickles_without_handle(tmp_path):
    import pickle

    path = tmp_path / "a.tfrecord"
    records.write_tfrecords(path, [b"one", b"two"])
    reader = records.RecordFileReader(path)
    assert reader.read(0) == b"one"
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(19) == b"two"


def test_header_layout_is_tfrecord():
    framed = records.frame_record(b"hello")
    length, _ = struct.unpack("<QI", framed[:12])
    assert length == 5 and framed[12:17] == b"hello" and len(framed) == 21


def test_manifest_save_load_and_verify(tmp_path):
    from data_pipelines import manifest as mf

    shard = tmp_path / mf.shard_name("train", 0, 1, "tfrecord")
    records.write_tfrecords(shard, [b"r"])
    split = mf.Split(
        shards=(mf.Shard(shard.name, 1, mf.file_sha256(shard)),), num_records=1,
        class_counts=(1, 0), mean=(0.5,), std=(0.1,),
    )
    m = mf.Manifest(
        dataset="d", modality="ct", format="tfrecord", label_names=("a", "b"), multi_label=False,
        pixel_depth=8, channels=1, feature_spec=records.FEATURE_SPEC, splits={"train": split},
        windows=(mf.Window("soft", 40, 400),),
    )
    mf.save_manifest(m, tmp_path)
    loaded = records.load_manifest(tmp_path)
    assert loaded == m and loaded.shard_paths("train") == [shard.resolve()]
    assert loaded.mean == (0.5,) and shard.name == "train-00000-of-00001.tfrecord"
    mf.verify_shards(loaded)
    shard.write_bytes(b"changed")
    with pytest.raises(ValueError, match="sha256"):
        mf.verify_shards(loaded)
    with pytest.raises(KeyError, match="no split 'test'"):
        loaded.shard_paths("test")
    # A manifest naming a shard format no reader here reads (an old converter's array_record) is refused.
    data = json.loads((tmp_path / mf.MANIFEST_NAME).read_text())
    (tmp_path / mf.MANIFEST_NAME).write_text(json.dumps({**data, "format": "array_record"}))
    with pytest.raises(ValueError, match="'array_record'.*convert it again"):
        records.load_manifest(tmp_path)
    with pytest.raises(ValueError, match="format 'array_record' not in"):
        mf.shard_name("train", 0, 1, "array_record")


def test_pooled_stats_equal_direct_computation():
    from data_pipelines import manifest as mf

    rng = np.random.default_rng(0)
    a, b = rng.random(30), rng.random(70)
    splits = [mf.Split((), len(x), (), (float(x.mean()),), (float(x.std()),)) for x in (a, b)]
    mean, std = mf.pooled_stats(splits)
    both = np.concatenate([a, b])
    np.testing.assert_allclose([mean[0], std[0]], [both.mean(), both.std()], rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.binary(max_size=200), min_size=1, max_size=8), data=st.data())
def test_any_single_byte_change_is_caught(tmp_path_factory, payloads, data):
    """CRC32C catches every error burst of up to 32 bits: so any one changed byte, anywhere in a shard."""
    path = tmp_path_factory.mktemp("fuzz") / "f.tfrecord"
    records.write_tfrecords(path, payloads)
    assert [p for _, p in records.iter_records(path)] == payloads
    raw = bytearray(path.read_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptRecordError):
        list(records.iter_records(path))
