"""DICOM conversion on synthetic files: HU windows, MONOCHROME1, multi-frame, no pixel data, privacy."""

import pathlib

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from data_pipelines import convert as cli
from data_pipelines import records
from data_pipelines.manifest import Window
from data_pipelines.privacy import image_id
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert
from data_pipelines.sources.dicom import DicomSource

KEY = bytes(range(32))
WINDOWS = (Window("abdomen", 40, 400), Window("lung", -600, 1500), Window("w", 25, 3))
PATIENT = dict(PatientName="Doe^Jane^Q", PatientID="PID-4711-SECRET", PatientBirthDate="19610714",
               StudyDate="20240229", AccessionNumber="ACC-99-XYZ", InstitutionName="St Elsewhere Hospital")


def make_dicom(path: pathlib.Path, pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
               bits_stored: int = 12, slope: float | None = 1.0, intercept: float = -1024.0, frames: int = 0,
               with_pixels: bool = True, patient: dict | None = None) -> str:
    """Writes a DICOM file with identifying tags; returns its SOP Instance UID."""
    uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for name, value in (patient or PATIENT).items():
        setattr(ds, name, value)
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.ndim >= 3 and photometric == "RGB" else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames:
        ds.NumberOfFrames = frames
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return uid


def windowed(hu: np.ndarray, windows) -> np.ndarray:
    """The expected uint8 channels, written out here independently of sources/ct.py."""
    out = np.empty(hu.shape + (len(windows),), np.uint8)
    for c, w in enumerate(windows):
        lo = w.level - w.width / 2
        out[..., c] = np.clip(np.rint((hu.astype(np.float64) - lo) * 255.0 / w.width), 0, 255)
    return out


def examples(manifest) -> dict[str, dict]:
    return {
        e["image_id"]: e
        for split in manifest.splits
        for path in manifest.shard_paths(split)
        for e in (records.decode_example(p) for _, p in records.iter_records(path))
    }


def options(tmp_path, **kw):
    return ConvertOptions(dataset="d", out_dir=tmp_path / "out", progress=False, fractions={"train": 1.0}, **kw)


def test_ct_rescale_to_hu_and_windows(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(-2048, 2048, (2, 12, 10), dtype=np.int16)  # 12 bits stored, signed
    uids = [make_dicom(tmp_path / "in" / f"f{i}", stored[i], slope=0.5, intercept=-300.0) for i in range(2)]
    m = convert(DicomSource(tmp_path / "in", modality="ct", windows=WINDOWS), KEY, options(tmp_path)).manifest
    assert m.windows == WINDOWS and m.channels == 3 and m.pixel_depth == 8
    got = examples(m)
    for i, uid in enumerate(uids):
        hu = stored[i] * 0.5 - 300.0
        image = records.decode_image(got[image_id(KEY, uid)]["image"], channels=3)
        np.testing.assert_array_equal(image, windowed(hu, WINDOWS))
    # The narrow window saturates: both ends occur.
    assert {0, 255} <= set(np.unique(image[..., 2]))


def test_monochrome1_is_inverted_and_kept_at_16_bits(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 4096, (9, 7), dtype=np.uint16)
    uid = make_dicom(tmp_path / "in/cr", pixels, modality="CR", photometric="MONOCHROME1", slope=None)
    m = convert(DicomSource(tmp_path / "in", modality="cxr", windows=WINDOWS), KEY, options(tmp_path)).manifest
    assert m.pixel_depth == 16 and m.windows is None and m.channels == 1
    ex = examples(m)[image_id(KEY, uid)]
    np.testing.assert_array_equal(records.decode_image16(ex["image"])[:, :, 0], 4095 - pixels)


def test_multi_frame_gives_a_record_per_frame_at_a_stride(tmp_path):
    frames = np.random.default_rng(2).integers(0, 256, (5, 6, 8), dtype=np.uint8)
    uid = make_dicom(tmp_path / "in/us", frames, modality="US", bits_stored=8, slope=None, frames=5)
    source = DicomSource(tmp_path / "in", modality="us", windows=WINDOWS, frame_stride=2)
    got = examples(convert(source, KEY, options(tmp_path)).manifest)
    assert len(got) == 3
    for f in (0, 2, 4):
        ex = got[image_id(KEY, f"{uid}#frame{f}")]
        np.testing.assert_array_equal(records.decode_image(ex["image"], channels=1)[:, :, 0], frames[f])


def test_rgb_is_kept(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    uid = make_dicom(tmp_path / "in/rgb", rgb, modality="US", photometric="RGB", bits_stored=8, slope=None)
    got = examples(convert(DicomSource(tmp_path / "in", modality="us", windows=WINDOWS, channels=3), KEY,
                           options(tmp_path)).manifest)
    np.testing.assert_array_equal(records.decode_image(got[image_id(KEY, uid)]["image"]), rgb)


def test_dicom_without_pixel_data_errors_by_id_or_is_skipped(tmp_path):
    name = "1.2.826.0.1.3680043.2.1125.1.777"
    uid = make_dicom(tmp_path / "in" / name, np.zeros((4, 4), np.int16), with_pixels=False)
    make_dicom(tmp_path / "in/good", np.zeros((4, 4), np.int16))
    source = DicomSource(tmp_path / "in", modality="ct", windows=WINDOWS)
    with pytest.raises(ConversionError, match="DICOM without pixel data") as e:
        convert(source, KEY, options(tmp_path))
    assert image_id(KEY, uid) in str(e.value) and name not in str(e.value) and uid not in str(e.value)
    report = convert(source, KEY, options(tmp_path, skip_bad=True, overwrite=True))
    assert report.skipped == {"DICOM without pixel data": 1} and report.skipped_ids == (image_id(KEY, uid),)
    assert sum(report.written.values()) == 1


def test_not_a_dicom_file_is_a_counted_skip(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/garbage.dcm").write_bytes(b"\x00" * 300)
    make_dicom(tmp_path / "in/good", np.zeros((4, 4), np.int16))
    report = convert(DicomSource(tmp_path / "in", modality="ct", windows=WINDOWS), KEY, options(tmp_path, skip_bad=True))
    assert report.skipped == {"not a readable DICOM file": 1}


def test_no_tag_value_or_file_name_in_anything_written(tmp_path, capsys):
    """Shards, manifest, resume state and the CLI's output hold no tag value and no source file name."""
    rng = np.random.default_rng(4)
    secrets: set[str] = set(PATIENT.values())
    src = tmp_path / "in"
    for i in range(6):
        name = f"CT.1.3.12.2.1107.5.1.4.{60064 + i}.3000002212080811342800001{i}"
        uid = make_dicom(src / "series" / name, rng.integers(-1000, 2000, (8, 8), dtype=np.int16))
        secrets |= {name, uid}
    secrets.add(make_dicom(src / "series" / "NOPIXELS_Doe_Jane.dcm", np.zeros((4, 4), np.int16), with_pixels=False))
    secrets.add("NOPIXELS_Doe_Jane")
    import pydicom

    for path in (src / "series").iterdir():
        ds = pydicom.dcmread(path)
        secrets |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    key_file = tmp_path / "id.key"
    cli.main(["new-key", str(key_file)])
    capsys.readouterr()
    out = tmp_path / "out"
    argv = ["dicom", str(src), "--modality", "ct", "--dataset", "ct", "--out", str(out), "--id-key-file",
            str(key_file), "--workers", "2", "--shard-size", "2"]
    assert cli.main(argv) == 1  # stops at the file without pixel data, naming its id
    assert cli.main([*argv, "--skip-bad"]) == 0  # resumes, skipping and counting it
    captured = capsys.readouterr()
    logs = (captured.out + captured.err).encode()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"manifest.json", ".convert_state.json"}
    for secret in secrets:
        needles = {secret.encode(), secret.encode("utf-16-le"), secret.replace("^", " ").encode()}
        for path in written:
            data = path.read_bytes()
            assert not any(n in data for n in needles), f"{secret!r} leaked into {path.name}"
        assert not any(n in logs for n in needles), f"{secret!r} leaked into the CLI output"
    assert b"skipped 1 inputs" in logs and b"DICOM without pixel data" in logs


def test_a_relative_and_an_absolute_folder_give_the_same_dataset(tmp_path, monkeypatch):
    """A file without UIDs (blanked ones, or an unreadable file) is keyed by its path relative to
    the folder, so the ids, splits and skipped ids do not depend on how the folder was typed."""
    import pydicom

    rng = np.random.default_rng(7)
    for i in range(3):
        make_dicom(tmp_path / "in" / "series" / f"slice{i}", rng.integers(-1000, 2000, (8, 8), dtype=np.int16))
    blank = tmp_path / "in" / "series" / "blank"
    make_dicom(blank, rng.integers(-1000, 2000, (8, 8), dtype=np.int16))
    ds = pydicom.dcmread(blank)
    ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID = "", ""
    ds.save_as(blank)
    (tmp_path / "in" / "series" / "garbage.dcm").write_bytes(b"\x00" * 300)
    monkeypatch.chdir(tmp_path)
    reports = {}
    for root, out in (("in", "relative"), (tmp_path / "in", "absolute"), ("./in/series/..", "dotted")):
        source = DicomSource(root, modality="ct", windows=WINDOWS)
        reports[out] = convert(source, KEY, ConvertOptions(dataset="d", out_dir=tmp_path / out, progress=False,
                                                           skip_bad=True, shard_size=2))
    assert reports["relative"].skipped_ids == (image_id(KEY, "series/garbage.dcm"),)
    assert image_id(KEY, "series/blank") in examples(reports["relative"].manifest)
    files = {out: {p.name: p.read_bytes() for p in (tmp_path / out / "d").iterdir()} for out in reports}
    assert files["relative"] == files["absolute"] == files["dotted"]
