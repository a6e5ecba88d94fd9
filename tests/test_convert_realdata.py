"""Round trips on the shared real data: decoded shards equal the sources (../shared/realdata)."""

import csv
import shutil

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut

from data_pipelines import records
from data_pipelines.manifest import Window, verify_shards
from data_pipelines.privacy import image_id
from data_pipelines.shard_writer import ConvertOptions, convert
from data_pipelines.sources.csv_manifest import CsvSource
from data_pipelines.sources.dicom import DicomSource
from data_pipelines.sources.image_folder import ImageFolderSource
from data_pipelines.sources.medmnist import MedMnistSource
from data_pipelines.sources.nifti import NiftiSource

pytestmark = pytest.mark.realdata

KEY = bytes(range(32))
WINDOWS = (Window("abdomen", 40, 400), Window("lung", -600, 1500), Window("bone", 400, 1800))


def by_id(manifest) -> dict[str, dict]:
    verify_shards(manifest)
    out = {}
    for split in manifest.splits:
        for path in manifest.shard_paths(split):
            for _, payload in records.iter_records(path):
                ex = records.decode_example(payload)
                out[ex["image_id"]] = {**ex, "split": split}
    return out


def windowed(hu: np.ndarray) -> np.ndarray:
    """HU -> uint8 channels, computed here independently of the converter."""
    out = np.empty(hu.shape + (3,), np.uint8)
    for c, (level, width) in enumerate([(40, 400), (-600, 1500), (400, 1800)]):
        out[..., c] = np.clip(np.rint((hu - (level - width / 2)) * 255.0 / width), 0, 255)
    return out


def options(tmp_path, name, **kw):
    return ConvertOptions(dataset=name, out_dir=tmp_path, progress=False, shard_size=512, **kw)


@pytest.mark.parametrize("name", ["retinamnist", "pneumoniamnist", "breastmnist", "pathmnist_train1000"])
def test_medmnist_npz(realdata, tmp_path, name):
    path = realdata / "medmnist" / f"{name}.npz"
    m = convert(MedMnistSource(path), KEY, options(tmp_path, name)).manifest
    got = by_id(m)
    with np.load(path) as npz:
        splits = [s for s in ("train", "val", "test") if f"{s}_images" in npz.files]
        total = 0
        for split in splits:
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(-1)
            total += len(images)
            for i in range(len(images)):
                ex = got[image_id(KEY, f"{name}.npz/{split}/{i}")]
                channels = 1 if images.ndim == 3 else 3
                decoded = records.decode_image(ex["image"], channels=channels)
                np.testing.assert_array_equal(decoded.reshape(images[i].shape), images[i])
                assert list(ex["labels"]) == [labels[i]]
                if len(splits) > 1:
                    assert ex["split"] == split
    assert len(got) == total
    if len(splits) == 1:  # a train-only file is split, stratified
        assert set(m.splits) == {"train", "val", "test"}
        assert abs(m.splits["train"].num_records - 800) <= len(m.label_names)  # rounding per class


def test_nih_folder_binary(realdata, tmp_path):
    root = realdata / "cxr_nih1000" / "NIH1000"
    m = convert(ImageFolderSource(root, modality="cxr"), KEY, options(tmp_path, "nih2")).manifest
    assert m.label_names == ("0_normal", "1_abnormal") and set(m.splits) == {"train", "val", "test"}
    assert {s: m.splits[s].num_records for s in m.splits} == {"train": 600, "val": 200, "test": 200}
    got = by_id(m)
    for path in sorted(root.rglob("*.png")):
        rel = path.relative_to(root).as_posix()
        ex = got[image_id(KEY, rel)]
        source = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert (source[..., 0] == source[..., 1]).all() and (source[..., 1] == source[..., 2]).all()
        np.testing.assert_array_equal(records.decode_image(ex["image"], channels=1)[:, :, 0], source[..., 0])
        assert list(ex["labels"]) == [m.label_names.index(path.parent.name)]


def test_nih_csv_fourteen_findings(realdata, tmp_path):
    csv_path = realdata / "cxr_nih1000" / "labels.csv"
    source = CsvSource(csv_path, modality="cxr", label_column="nih_finding_labels", multi_label=True,
                       none_value="No Finding", split_column="split", patient_column="patient_id")
    m = convert(source, KEY, options(tmp_path, "nih14")).manifest
    assert len(m.label_names) == 14 and m.multi_label
    got = by_id(m)
    rows = list(csv.DictReader(open(csv_path)))
    counts = np.zeros(14, int)
    for row in rows:
        ex = got[image_id(KEY, row["path"])]
        findings = [f for f in row["nih_finding_labels"].split("|") if f != "No Finding"]
        assert list(ex["labels"]) == sorted(m.label_names.index(f) for f in findings)
        counts[list(ex["labels"])] += 1
        source = cv2.imread(str(csv_path.parent / row["path"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(records.decode_image(ex["image"], channels=1)[:, :, 0], source[..., 0])
        assert ex["split"] == {"valid": "val"}.get(row["split"], row["split"])
    assert tuple(counts) == tuple(sum(m.splits[s].class_counts[i] for s in m.splits) for i in range(14))


def test_isic_jpeg_folder(realdata, tmp_path):
    root = realdata / "derm_isic_uda1"
    source = CsvSource(root / "labels.csv", modality="derm", path_column="image", path_format="images/{}.jpg",
                       label_column="benign_malignant")
    m = convert(source, KEY, options(tmp_path, "isic")).manifest
    assert m.label_names == ("benign", "malignant")
    assert sum(m.splits[s].class_counts[1] for s in m.splits) == 159
    got = by_id(m)
    assert len(got) == 557
    for row in csv.DictReader(open(root / "labels.csv")):
        path = root / "images" / f"{row['image']}.jpg"
        ex = got[image_id(KEY, f"images/{row['image']}.jpg")]
        assert ex["image"] == path.read_bytes() and ex["image_format"] == "jpeg"  # stored unchanged
        np.testing.assert_array_equal(records.decode_image(ex["image"]), cv2.imread(str(path))[:, :, ::-1])


def _series(realdata):
    files = sorted((realdata / "ct_totalsegmentator_example" / "example_ct_dicom").iterdir())
    slices = [pydicom.dcmread(f) for f in files]
    return sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))


def test_ct_nifti_equals_independent_windowing(realdata, tmp_path):
    path = realdata / "ct_totalsegmentator_example" / "example_ct_sm.nii.gz"
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")  # so the test needs no reorientation
    hu = np.asarray(image.dataobj, np.float64) * image.dataobj.slope + image.dataobj.inter
    m = convert(NiftiSource(path, windows=WINDOWS, slice_stride=3), KEY, options(tmp_path, "ts")).manifest
    got = by_id(m)
    assert len(got) == 10
    for k in range(0, hu.shape[2], 3):
        # Radiological layout: rows anterior -> posterior, columns patient right -> left.
        expected = windowed(np.flip(hu[:, :, k], (0, 1)).T)
        np.testing.assert_array_equal(records.decode_image(got[image_id(KEY, f"{path.resolve()}#z{k}")]["image"]),
                                      expected)


def test_ct_dicom_series_and_nifti_of_it_agree(realdata, tmp_path):
    series = _series(realdata)
    folder = realdata / "ct_totalsegmentator_example" / "example_ct_dicom"
    m = convert(DicomSource(folder, modality="ct", windows=WINDOWS), KEY, options(tmp_path, "ts_dicom")).manifest
    got = by_id(m)
    assert len(got) == 20
    dicom_images = []
    for ds in series:
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        uid = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID  # this series blanks the first
        image = records.decode_image(got[image_id(KEY, str(uid))]["image"])
        np.testing.assert_array_equal(image, windowed(hu))
        dicom_images.append(image)
    # The same volume as NIfTI, its affine built here from the DICOM geometry (LPS -> RAS), stored
    # voxel (i, j, k) = (column, row, slice): orientation L, P, S, as a DICOM-to-NIfTI tool writes it.
    assert all(list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0] for ds in series)
    row_spacing, column_spacing = (float(v) for v in series[0].PixelSpacing)
    dz = float(series[1].ImagePositionPatient[2]) - float(series[0].ImagePositionPatient[2])
    x0, y0, z0 = (float(v) for v in series[0].ImagePositionPatient)
    affine = np.array([[-column_spacing, 0, 0, -x0], [0, -row_spacing, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]])
    volume = np.stack([ds.pixel_array.astype(np.int16).T for ds in series], axis=2)
    nifti = nib.Nifti1Image(volume, affine)
    nifti.header.set_slope_inter(float(series[0].RescaleSlope), float(series[0].RescaleIntercept))
    (tmp_path / "nii").mkdir()
    nib.save(nifti, tmp_path / "nii" / "vol.nii.gz")
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    n = convert(NiftiSource(tmp_path / "nii", windows=WINDOWS), KEY, options(tmp_path, "ts_nifti")).manifest
    from_nifti = by_id(n)
    key = str((tmp_path / "nii" / "vol.nii.gz").resolve())
    for k, image in enumerate(dicom_images):
        np.testing.assert_array_equal(records.decode_image(from_nifti[image_id(KEY, f"{key}#z{k}")]["image"]), image)


def test_dicom_samples(realdata, tmp_path):
    src = realdata / "dicom_samples"
    groups = {"ct": ["CT_small.dcm", "693_UNCR.dcm", "ctbrain1.dcm"],
              "us": ["GREYSCALE_IMAGE.dcm", "OBXXXX1A.dcm", "US1_UNCR.dcm"], "cxr": ["RG1_J2KI.dcm"]}
    for modality, names in groups.items():
        folder = tmp_path / "in" / modality
        folder.mkdir(parents=True)
        for name in names:  # a temporary copy, so each modality is converted as its own dataset
            shutil.copy(src / name, folder / name)
        source = DicomSource(folder, modality=modality, windows=WINDOWS, channels=3 if modality == "us" else None)
        m = convert(source, KEY, options(tmp_path / "out", modality, fractions={"train": 1.0})).manifest
        got = by_id(m)
        assert len(got) == len(names)
        for name in names:
            ds = pydicom.dcmread(folder / name)
            ex = got[image_id(KEY, str(ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID))]
            pixels = ds.pixel_array
            if name in ("CT_small.dcm", "693_UNCR.dcm"):
                hu = pixels.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                np.testing.assert_array_equal(records.decode_image(ex["image"]), windowed(hu))
            elif name == "ctbrain1.dcm":  # a rendered secondary capture (YBR JPEG): kept as rendered
                np.testing.assert_array_equal(records.decode_image(ex["image"]), pixels)
            elif name == "OBXXXX1A.dcm":
                rgb = apply_color_lut(pixels, ds)
                assert rgb.dtype == np.uint16 and (rgb % 256 == 0).all()  # 8-bit colours in 16-bit LUT entries
                np.testing.assert_array_equal(records.decode_image(ex["image"]), rgb // 256)
            elif name == "RG1_J2KI.dcm":  # MONOCHROME1, 15 bits, JPEG 2000 (pillow decodes it)
                assert m.pixel_depth == 16
                expected = (2 ** int(ds.BitsStored) - 1) - pixels.astype(np.int64)
                np.testing.assert_array_equal(records.decode_image16(ex["image"])[:, :, 0], expected)
            else:
                expected = pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2)
                np.testing.assert_array_equal(records.decode_image(ex["image"]), expected)
        written = b"".join(p.read_bytes() for p in (tmp_path / "out" / modality).iterdir())
        for name in names:
            ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
            values = [str(ds.get(t, "")) for t in ("PatientName", "PatientID", "StudyDate", "SOPInstanceUID",
                                                   "StudyInstanceUID", "SeriesInstanceUID")]
            values.append(str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")))
            for value in [v for v in values if len(v) >= 4] + [name.removesuffix(".dcm")]:
                assert value.encode() not in written, f"{value!r} of a source DICOM leaked"
