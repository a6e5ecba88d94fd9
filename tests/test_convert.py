"""The conversion engine, splits, demo data, image folders, CSV manifests and the CLI (synthetic inputs)."""

import collections
import dataclasses
import pathlib
import traceback

import cv2
import numpy as np
import pytest

from data_pipelines import convert as cli
from data_pipelines import manifest as mf
from data_pipelines import records
from data_pipelines.modalities import MODALITIES, modality_id
from data_pipelines.privacy import image_id
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert, kept_shard, read_marker
from data_pipelines.sources.csv_manifest import CsvSource
from data_pipelines.sources.image_folder import ImageFolderSource
from data_pipelines.sources.synthetic import (
    CLASS_NAMES,
    SyntheticSource,
    demo_key,
    synthetic_image,
    write_demo_data,
)
from data_pipelines.splits import assign_splits, parse_fractions

KEY = bytes(range(32))


def read_split(manifest: mf.Manifest, split: str) -> list[dict]:
    return [records.decode_example(p) for path in manifest.shard_paths(split) for _, p in records.iter_records(path)]


def read_all(manifest: mf.Manifest) -> list[dict]:
    return [e for split in manifest.splits for e in read_split(manifest, split)]


def test_demo_data_round_trip_and_manifest_statistics(tmp_path):
    manifests = write_demo_data(tmp_path, images_per_modality=12, size=24, seed=3, shard_size=4)
    assert [m.modality for m in manifests] == list(MODALITIES)
    for m in manifests:
        loaded = records.load_manifest(tmp_path / f"demo_{m.modality}")
        assert loaded == m and loaded.label_names == CLASS_NAMES
        mf.verify_shards(loaded)
        examples = read_all(m)
        assert len(examples) == 12 == sum(s.num_records for s in m.splits.values())
        expected_ids = {image_id(demo_key(3), f"synthetic/{m.modality}/{i}"): i for i in range(12)}
        for ex in examples:
            i = expected_ids[ex["image_id"]]
            rng = np.random.default_rng([3, modality_id(m.modality), i])
            np.testing.assert_array_equal(
                records.decode_image(ex["image"], channels=ex["channels"]),
                synthetic_image(m.modality, i % 4, 24, rng),
            )
            assert list(ex["labels"]) == [i % 4] and ex["modality"] == m.modality
        # Statistics measured independently from the decoded train images.
        train = np.stack([records.decode_image(e["image"], channels=m.channels) for e in read_split(m, "train")])
        x = train.reshape(len(train), -1, m.channels) / 255.0
        mean = x.mean(axis=1).mean(axis=0)
        std = np.sqrt(np.square(x).mean(axis=1).mean(axis=0) - mean**2)
        np.testing.assert_allclose(m.mean, mean, atol=1e-9)
        np.testing.assert_allclose(m.std, std, atol=1e-9)
        counts = collections.Counter(int(e["labels"][0]) for e in read_split(m, "train"))
        assert m.splits["train"].class_counts == tuple(counts[c] for c in range(4))


def test_synthetic_classes_are_separable_by_a_simple_feature():
    """The latent class is learnable: a nearest-centroid on radial power spectra beats chance by far."""
    def feature(img):
        f = np.abs(np.fft.fftshift(np.fft.fft2(img[:, :, 0] - img[:, :, 0].mean())))
        y, x = np.indices(f.shape) - 16
        r = np.hypot(y, x).astype(int)
        return np.bincount(r.ravel(), f.ravel(), minlength=24)[:16] / np.bincount(r.ravel(), minlength=24)[:16]

    rng = np.random.default_rng(0)
    feats = {c: np.array([feature(synthetic_image("path", c, 32, rng)) for _ in range(20)]) for c in range(4)}
    centroids = {c: f[:10].mean(0) for c, f in feats.items()}
    correct = sum(
        min(centroids, key=lambda k: np.linalg.norm(v - centroids[k])) == c for c, f in feats.items() for v in f[10:]
    )
    assert correct / 40 >= 0.7


def test_splits_are_stratified_grouped_and_seeded():
    rng = np.random.default_rng(0)
    groups = [f"p{i // 3}" for i in range(900)]  # 300 patients, 3 images each
    patient_label = rng.integers(0, 3, 300)
    labels = [(int(patient_label[i // 3]),) for i in range(900)]
    fractions = parse_fractions("train=0.7,val=0.1,test=0.2")
    splits = assign_splits(labels, groups, fractions, seed=1)
    assert splits == assign_splits(labels, groups, fractions, seed=1)
    assert splits != assign_splits(labels, groups, fractions, seed=2)
    by_group = collections.defaultdict(set)
    for g, s in zip(groups, splits):
        by_group[g].add(s)
    assert all(len(s) == 1 for s in by_group.values())
    for c in range(3):
        members = [s for s, lab in zip(splits, labels) if lab == (c,)]
        share = collections.Counter(members)
        for name, frac in fractions.items():
            assert abs(share[name] / len(members) - frac) < 0.03
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.5,test=0.2")


def _synthetic_options(tmp_path, **kw):
    return ConvertOptions(dataset="syn", out_dir=tmp_path, shard_size=5, progress=False, **kw)


def test_resume_keeps_completed_shards_and_gives_identical_output(tmp_path):
    source = SyntheticSource("cxr", count=40, size=16, seed=0)
    reference = convert(source, KEY, _synthetic_options(tmp_path / "ref"))

    class Interrupt(Exception):
        pass

    written = []

    def interrupt_after_three(result):
        written.append(result.name)
        if len(written) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        convert(source, KEY, _synthetic_options(tmp_path / "run"), on_shard=interrupt_after_three)
    assert not (tmp_path / "run/syn/manifest.json").exists()
    resumed = convert(source, KEY, _synthetic_options(tmp_path / "run"))
    assert resumed.reused_shards == 3 and resumed.total_shards == reference.total_shards
    assert resumed.manifest == reference.manifest
    for split in reference.manifest.splits:
        for a, b in zip(reference.manifest.shard_paths(split), resumed.manifest.shard_paths(split)):
            assert a.read_bytes() == b.read_bytes()
    # A different plan (here: another key) must not mix with what is there.
    with pytest.raises(ConversionError, match="different plan"):
        convert(source, bytes(32), _synthetic_options(tmp_path / "run"))
    again = convert(source, bytes(32), _synthetic_options(tmp_path / "run", overwrite=True))
    assert again.reused_shards == 0


def test_a_damaged_completed_shard_is_rewritten_on_resume(tmp_path):
    source = SyntheticSource("us", count=10, size=16, seed=0)
    first = convert(source, KEY, _synthetic_options(tmp_path))
    victim = first.manifest.shard_paths("train")[0]
    # What a Beam worker asks of the shard it would write: kept whole, not once damaged.
    directory = _synthetic_options(tmp_path).directory
    assert kept_shard(directory, victim.name) == read_marker(directory, victim.name)
    victim.write_bytes(victim.read_bytes()[:-3])
    assert kept_shard(directory, victim.name) is None and kept_shard(directory, "no-such-shard") is None
    second = convert(source, KEY, _synthetic_options(tmp_path))
    assert second.reused_shards == first.total_shards - 1
    mf.verify_shards(second.manifest)


def test_parallel_equals_serial(tmp_path):
    source = SyntheticSource("derm", count=24, size=16, seed=1)
    serial = convert(source, KEY, _synthetic_options(tmp_path / "a"))
    parallel = convert(source, KEY, _synthetic_options(tmp_path / "b", workers=2))
    assert dataclasses.replace(serial.manifest, directory=None) == dataclasses.replace(parallel.manifest, directory=None)


def _png(path: pathlib.Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.encode_png(image))


def _folder(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    root, images = tmp_path / "folder", {}
    for split in ("train", "valid"):
        for cls in ("benign", "malignant"):
            for i in range(3):
                image = rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8)
                rel = f"{split}/{cls}/img{i}.png"
                _png(root / rel, image)
                images[rel] = image
    return root, images


def test_image_folder_round_trip_is_exact(tmp_path):
    root, images = _folder(tmp_path)
    report = convert(ImageFolderSource(root, modality="derm"), KEY, _synthetic_options(tmp_path / "out"))
    m = report.manifest
    assert m.label_names == ("benign", "malignant") and set(m.splits) == {"train", "val"}
    by_id = {image_id(KEY, rel): rel for rel in images}
    for split in m.splits:
        for ex in read_split(m, split):
            rel = by_id[ex["image_id"]]
            assert rel.startswith({"train": "train", "val": "valid"}[split])
            np.testing.assert_array_equal(records.decode_image(ex["image"]), images[rel])
            assert list(ex["labels"]) == [m.label_names.index(rel.split("/")[1])]
            assert ex["image"] == (root / rel).read_bytes()  # RGB PNG stored as is


def test_jpeg_bytes_are_stored_unchanged_and_grey_is_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    (tmp_path / "src/a").mkdir(parents=True)
    ok, jpg = cv2.imencode(".jpg", rgb)
    (tmp_path / "src/a/x.jpg").write_bytes(jpg.tobytes())
    m = convert(ImageFolderSource(tmp_path / "src", modality="path"), KEY,
                _synthetic_options(tmp_path / "o1", fractions={"train": 1.0})).manifest
    (ex,) = read_all(m)
    assert ex["image"] == jpg.tobytes() and ex["image_format"] == "jpeg"
    grey = convert(ImageFolderSource(tmp_path / "src", modality="cxr"), KEY,
                   _synthetic_options(tmp_path / "o2", fractions={"train": 1.0})).manifest
    (ex,) = read_all(grey)
    assert ex["channels"] == 1 and ex["image_format"] == "png"
    decoded = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(records.decode_image(ex["image"], channels=1)[:, :, 0],
                                  cv2.cvtColor(decoded, cv2.COLOR_BGR2GRAY))


def test_csv_multilabel_with_patients_and_path_format(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["name,findings,patient"]
    for i in range(40):
        _png(tmp_path / "imgs" / f"n{i}.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
        findings = ["No Finding", "Mass", "Mass|Effusion", "Effusion"][i % 4]
        rows.append(f"n{i},{findings},{i // 4}")
    (tmp_path / "l.csv").write_text("\n".join(rows))
    source = CsvSource(tmp_path / "l.csv", modality="cxr", path_column="name", path_format="imgs/{}.png",
                       label_column="findings", multi_label=True, none_value="No Finding",
                       patient_column="patient")
    m = convert(source, KEY, _synthetic_options(tmp_path / "out")).manifest
    assert m.label_names == ("Effusion", "Mass") and m.multi_label
    expected = {image_id(KEY, f"imgs/n{i}.png"): [[], [1], [0, 1], [0]][i % 4] for i in range(40)}
    patient_split = {}
    for split in m.splits:
        for ex in read_split(m, split):
            assert list(ex["labels"]) == expected[ex["image_id"]]
    for i in range(40):
        split = next(s for s in m.splits if image_id(KEY, f"imgs/n{i}.png") in {e["image_id"] for e in read_split(m, s)})
        assert patient_split.setdefault(i // 4, split) == split  # a patient stays in one split
    total = sum(m.splits[s].class_counts[0] for s in m.splits)
    assert total == 20  # "Mass|Effusion" and "Effusion" rows


def test_bad_image_stops_with_its_name_or_is_skipped_and_counted(tmp_path):
    root, _ = _folder(tmp_path)
    bad = root / "train/benign/img1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    (root / "train/benign/junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ConversionError, match="img1.png|junk.png") as e:
        convert(ImageFolderSource(root, modality="derm"), KEY, _synthetic_options(tmp_path))
    assert "skip" in str(e.value)
    # The same run resumed under the skip policy: the bad inputs are skipped and counted.
    report = convert(ImageFolderSource(root, modality="derm"), KEY, _synthetic_options(tmp_path, skip_bad=True))
    assert report.skipped == {"undecodable image": 2}
    assert set(report.skipped_ids) == {image_id(KEY, "train/benign/img1.png"), image_id(KEY, "train/benign/junk.png")}
    assert sum(report.written.values()) == 11
    assert "2 x undecodable image" in report.summary()


class _Unexpected(SyntheticSource):
    """A source whose loading fails as no source expects, the error's message naming a file."""

    def __init__(self, private: bool):
        super().__init__("ct", count=4, size=8, seed=0)
        self.private = private

    def load(self, item):
        raise RuntimeError("cannot read /data/Doe_Jane/1.dcm")


@pytest.mark.parametrize("private", [False, True])
def test_an_unexpected_error_keeps_its_cause_unless_the_source_is_private(tmp_path, private):
    """A runner's worker (Beam's) logs a failure's whole traceback, chained causes included; a
    private (DICOM/NIfTI) source's cause may name a patient, so it is left out of the chain."""
    with pytest.raises(ConversionError, match=r"unexpected error \(RuntimeError") as e:
        convert(_Unexpected(private), KEY, _synthetic_options(tmp_path))
    shown = "".join(traceback.format_exception(e.value))
    assert ("Doe_Jane" in shown) is not private
    assert (e.value.__cause__ is None) is private


def test_cli_folder_conversion_and_key_checks(tmp_path, capsys):
    root, _ = _folder(tmp_path)
    key_file = tmp_path / "id.key"
    assert cli.main(["new-key", str(key_file)]) == 0
    def args(key):
        return ["folder", str(root), "--modality", "derm", "--dataset", "f", "--out", str(tmp_path / "out"),
                "--id-key-file", str(key), "--workers", "1", "--no-progress", "--shard-size", "2"]

    assert cli.main(args(key_file)) == 0
    out = capsys.readouterr().out
    assert "f: 12 records in 6 shards (0 kept" in out and "skipped 0 inputs" in out
    assert cli.main(args(key_file)) == 0
    assert "(6 kept from an earlier run)" in capsys.readouterr().out
    inside = tmp_path / "out" / "id.key"
    inside.write_text(key_file.read_text())
    assert cli.main(args(inside)) == 1
    assert "inside the output" in capsys.readouterr().err


def test_cli_demo(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--images-per-modality", "8", "--size", "16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"demo_{m}" for m in MODALITIES)
    assert "demo_ct: " in capsys.readouterr().out


def test_a_run_that_dies_mid_shard_resumes(tmp_path):
    source = SyntheticSource("path", count=12, size=16, seed=0)
    reference = convert(source, KEY, _synthetic_options(tmp_path / "ref"))
    real_load = SyntheticSource.load
    calls = 0

    def dying_load(self, item):
        nonlocal calls
        calls += 1
        if calls == 8:  # inside the second shard: its .partial file is left behind
            raise KeyboardInterrupt
        return real_load(self, item)

    SyntheticSource.load = dying_load
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(source, KEY, _synthetic_options(tmp_path / "run"))
    finally:
        SyntheticSource.load = real_load
    assert any(p.name.endswith(".partial") for p in (tmp_path / "run/syn").iterdir())
    resumed = convert(source, KEY, _synthetic_options(tmp_path / "run"))
    assert resumed.reused_shards == 1 and resumed.manifest == dataclasses.replace(
        reference.manifest, directory=resumed.manifest.directory)


def test_cli_wires_every_source_kind(tmp_path):
    import nibabel as nib

    (tmp_path / "l.csv").write_text("path,label,split,pid\na.png,x,valid,1\n")
    np.savez(tmp_path / "octmnist_64.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 1)))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "f/c").mkdir(parents=True)
    parser = cli.build_parser()
    common = ["--out", str(tmp_path / "out"), "--dataset", "d"]
    folder = cli.make_source(parser.parse_args(["folder", str(tmp_path / "f"), "--modality", "cxr", *common]))
    assert isinstance(folder, ImageFolderSource) and folder.label_names == ("c",) and folder.channels == 1
    csv_source = cli.make_source(parser.parse_args(
        ["csv", str(tmp_path / "l.csv"), "--modality", "path", "--split-column", "split", "--patient-column", "pid",
         "--label-names", "x,y", *common]))
    assert csv_source.label_names == ("x", "y") and csv_source.items()[0].split == "val"
    assert csv_source.items()[0].group == "1" and csv_source.channels == 3
    dicom = cli.make_source(parser.parse_args(["dicom", str(tmp_path), "--modality", "ct", "--windows", "brain",
                                               "--frame-stride", "2", *common]))
    assert dicom.channels == 1 and dicom.windows[0].name == "brain" and dicom.frame_stride == 2
    nifti = cli.make_source(parser.parse_args(["nifti", str(tmp_path / "v.nii.gz"), "--slice-stride", "4", *common]))
    assert nifti.channels == 3 and len(nifti.items()) == 1
    argv = ["medmnist", str(tmp_path / "octmnist_64.npz"), "--out", str(tmp_path / "out"),
            "--splits", "train=0.5,test=0.5", "--no-progress", "--workers", "1"]
    assert parser.parse_args(argv).splits == {"train": 0.5, "test": 0.5}
    key_file = tmp_path / "id.key"
    key_file.write_text(KEY.hex())
    assert cli.main([*argv, "--id-key-file", str(key_file)]) == 0
    m = records.load_manifest(tmp_path / "out" / "octmnist_64")
    assert m.modality == "oct" and set(m.splits) == {"train", "test"}
