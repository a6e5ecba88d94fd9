"""NIfTI CT conversion on synthetic volumes: orientation, slice stride, HU windows as channels."""

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import records
from data_pipelines.manifest import Window
from data_pipelines.privacy import image_id
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert
from data_pipelines.sources.nifti import NiftiSource

KEY = bytes(range(32))
WINDOWS = (Window("abdomen", 40, 400), Window("lung", -600, 1500), Window("bone", 400, 1800))


def windowed(hu, windows):
    lo = np.array([w.level - w.width / 2 for w in windows])
    width = np.array([w.width for w in windows])
    return np.clip(np.rint((hu[..., None].astype(np.float64) - lo) * 255.0 / width), 0, 255).astype(np.uint8)


def decoded_slices(manifest, key_of) -> dict[int, np.ndarray]:
    out = {}
    for split in manifest.splits:
        for path in manifest.shard_paths(split):
            for _, payload in records.iter_records(path):
                ex = records.decode_example(payload)
                out[key_of[ex["image_id"]]] = records.decode_image(ex["image"], channels=len(WINDOWS))
    return out


@pytest.mark.parametrize("stored_as", ["RAS", "LPS", "LPI"])
def test_slices_are_radiological_whatever_the_stored_orientation(tmp_path, stored_as):
    rng = np.random.default_rng(0)
    ras = rng.integers(-1024, 2000, (7, 5, 6)).astype(np.int16)  # x: left->right, y: post->ant, z: inf->sup
    flips = {"RAS": (False, False, False), "LPS": (True, True, False), "LPI": (True, True, True)}[stored_as]
    data, affine = ras, np.diag([2.0, 2.0, 3.0, 1.0])
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis)
            affine[axis, axis] *= -1
            affine[axis, 3] = (ras.shape[axis] - 1) * 2.0 if axis < 2 else (ras.shape[axis] - 1) * 3.0
    path = tmp_path / "in" / "vol.nii.gz"
    path.parent.mkdir()
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    assert "".join(nib.aff2axcodes(affine)) == stored_as
    source = NiftiSource(tmp_path / "in", windows=WINDOWS, slice_stride=2)
    m = convert(source, KEY, ConvertOptions("v", tmp_path / "out", progress=False, fractions={"train": 1.0})).manifest
    assert m.windows == WINDOWS and m.channels == 3
    key_of = {image_id(KEY, f"{path.resolve()}#z{k}"): k for k in range(6)}
    slices = decoded_slices(m, key_of)
    assert sorted(slices) == [0, 2, 4]
    for k, image in slices.items():
        # Radiological layout computed here: row r runs anterior -> posterior, column c right -> left.
        expected_hu = np.array([[ras[ras.shape[0] - 1 - c, ras.shape[1] - 1 - r, k] for c in range(7)] for r in range(5)])
        np.testing.assert_array_equal(image, windowed(expected_hu, WINDOWS))


def test_unreadable_nifti_is_reported_by_id(tmp_path):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in" / "patient_smith.nii.gz"
    bad.write_bytes(b"not gzip at all")
    source = NiftiSource(tmp_path / "in", windows=WINDOWS)
    with pytest.raises(ConversionError, match="not a readable NIfTI") as e:
        convert(source, KEY, ConvertOptions("v", tmp_path / "out", progress=False))
    assert "smith" not in str(e.value) and image_id(KEY, str(bad.resolve())) in str(e.value)


def test_windows_must_be_one_or_three():
    with pytest.raises(ValueError, match="give 1 or 3"):
        NiftiSource(".", windows=WINDOWS[:2])


def test_parse_windows_presets_and_pairs():
    from data_pipelines.sources.ct import PRESETS, parse_windows

    assert parse_windows("abdomen, -600:1500 ,bone") == (PRESETS["abdomen"], Window("-600:1500", -600, 1500),
                                                         PRESETS["bone"])
    with pytest.raises(ValueError, match="preset"):
        parse_windows("abdomen,softish,bone")
    with pytest.raises(ValueError, match="positive"):
        parse_windows("40:0")
