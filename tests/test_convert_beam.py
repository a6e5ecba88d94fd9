"""Conversion on Apache Beam (its local runner, FnApiRunner, in multi-process mode with 2 workers)
against the local converter.

Every kind gives the local converter's dataset byte for byte (shards, indexes, markers, state and
manifest); corrupt inputs stop a run, named, or are counted with Beam metrics and skipped; a worker
killed mid-run fails the run, and running it again completes the same dataset, keeping the shards
already done; the privacy audit covers what a cluster runner would upload: the job graph, the
options, the temp location, besides the outputs and the logs; and Beam's options and the locations
a cluster's workers must reach are checked before anything runs.

Each pipeline run costs seconds of worker start-up, so one run checks several things where it can.
"""

from __future__ import annotations

import base64
import bz2
import functools
import logging
import os
import pathlib
import pickle
import re
import shlex
import shutil
import signal
import sys
import traceback
import zlib
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from beam_runs import beam_workers, dataset_files, kill_tree, run_cli, start_cli, wait_for
from test_convert_dicom import make_dicom
from test_privacy_audit import GROUPS, identifying_strings

import data_pipelines
from data_pipelines import beam_convert
from data_pipelines import convert as cli
from data_pipelines import privacy, records, storage
from data_pipelines.manifest import Window
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert
from data_pipelines.sources.csv_manifest import CsvSource
from data_pipelines.sources.dicom import DicomSource
from data_pipelines.sources.image_folder import ImageFolderSource
from data_pipelines.sources.medmnist import MedMnistSource
from data_pipelines.sources.nifti import NiftiSource

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
WINDOWS = (Window("abdomen", 40, 400), Window("lung", -600, 1500), Window("bone", 400, 1800))
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def assert_same_dataset(local: pathlib.Path, beam: pathlib.Path) -> None:
    expected, got = dataset_files(local), dataset_files(beam)
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    assert "manifest.json" in got


def _noise_folder(root, count: int, size: int, corrupt: int = 0):
    """ROOT/<class>/<n>.png of random pixels (slow to compress and decode: a real workload)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / ("benign", "malignant")[i % 2] / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(records.encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    for i in range(corrupt):
        (root / "benign" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _key_file(tmp_path):
    path = tmp_path / "keys" / "id.key"
    path.parent.mkdir()
    path.write_text(KEY.hex())
    return path


@pytest.mark.realdata
@pytest.mark.slow
def test_every_kind_of_real_data_equals_the_local_conversion(realdata, tmp_path, monkeypatch):
    """Folder, CSV (multi-label with patients; JPEG pass-through), MedMNIST (with and without its
    own splits), DICOM (a CT series; palette and RGB ultrasound) and NIfTI, in one pipeline."""
    us = tmp_path / "in" / "us"
    us.mkdir(parents=True)
    for name in GROUPS["us"]:
        shutil.copy(realdata / "dicom_samples" / name, us / name)
    nih = realdata / "cxr_nih1000"
    isic = realdata / "derm_isic_uda1"
    sources = {
        "nih2": ImageFolderSource(nih / "NIH1000", modality="cxr"),
        "nih14": CsvSource(nih / "labels.csv", modality="cxr", label_column="nih_finding_labels", multi_label=True,
                           none_value="No Finding", split_column="split", patient_column="patient_id"),
        "isic": CsvSource(isic / "labels.csv", modality="derm", path_column="image", path_format="images/{}.jpg",
                          label_column="benign_malignant"),
        "breastmnist": MedMnistSource(realdata / "medmnist" / "breastmnist.npz"),
        "pathmnist_train1000": MedMnistSource(realdata / "medmnist" / "pathmnist_train1000.npz"),
        "ct_series": DicomSource(realdata / "ct_totalsegmentator_example" / "example_ct_dicom", modality="ct",
                                 windows=WINDOWS),
        "us": DicomSource(us, modality="us", windows=WINDOWS, channels=3),
        "ct_nifti": NiftiSource(realdata / "ct_totalsegmentator_example" / "example_ct_sm.nii.gz", windows=WINDOWS,
                                slice_stride=3),
    }

    def options(out, dataset):
        return ConvertOptions(dataset=dataset, out_dir=out, shard_size=96, progress=False)

    for dataset, source in sources.items():
        convert(source, KEY, options(tmp_path / "local", dataset))
    monkeypatch.chdir(tmp_path)  # the workers import the installed package, not the repository
    done = beam_convert.run([(s, options(tmp_path / "beam", d)) for d, s in sources.items()],
                            functools.partial(bytes, KEY), beam_convert.pipeline_options(TWO_WORKERS, 2))
    for dataset in sources:
        assert_same_dataset(tmp_path / "local" / dataset, tmp_path / "beam" / dataset)
    assert {r.manifest.dataset: sum(r.written.values()) for r in done.reports} == {
        "nih2": 1000, "nih14": 1000, "isic": 557, "breastmnist": 780, "pathmnist_train1000": 1000,
        "ct_series": 20, "us": 3, "ct_nifti": 10}
    assert done.counters["nih2"]["records written"] == 1000 and done.counters["nih2"]["inputs listed"] == 1000


@pytest.mark.slow
def test_cli_demo_on_beam_equals_the_local_demo(tmp_path):
    common = ["demo", "--images-per-modality", "24", "--size", "24", "--shard-size", "8"]
    assert cli.main([*common, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0  # no process start-ups
    done = run_cli([*common, "--out", str(tmp_path / "beam"), "--runner=beam", "--workers", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for dataset in sorted(p.name for p in (tmp_path / "local").iterdir()):
        assert_same_dataset(tmp_path / "local" / dataset, tmp_path / "beam" / dataset)
    assert "demo_ct: 24 records in 4 shards (0 kept from an earlier run)" in done.stdout
    assert "beam counters: inputs listed 24, records written 24, shards written 4" in done.stdout


@pytest.mark.slow
def test_a_stopped_or_killed_run_resumes_to_the_local_dataset_counting_corrupt_inputs(tmp_path):
    """One command run three times over a folder with a corrupt image in about every tenth place:
    without --skip-bad it stops at one, named; with it, a worker killed mid-run fails the run; run
    again, it completes the local converter's dataset, keeping the shards done before and counting
    the corrupt inputs."""
    root = _noise_folder(tmp_path / "folder", count=480, size=96, corrupt=48)
    args = ["folder", str(root), "--modality", "derm", "--dataset", "noise", "--id-key-file",
            str(_key_file(tmp_path)), "--shard-size", "4", "--no-progress"]
    assert cli.main([*args, "--out", str(tmp_path / "local"), "--skip-bad", "--workers", "1"]) == 0
    beam_args = [*args, "--out", str(tmp_path / "beam"), "--runner=beam", "--workers", "2"]
    out = tmp_path / "beam" / "noise"

    def markers() -> int:
        return len(list(out.glob(".convert_done.*")))

    stopped = run_cli(beam_args, cwd=tmp_path)
    assert stopped.returncode == 1
    last = stopped.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: the Beam pipeline failed: ImageFolderSource item 'benign/broken\d+.png' .*"
                        r"\(use the skip policy, --skip-bad, to skip and count such inputs\)", last), last
    done_stopped = markers()

    started = start_cli([*beam_args, "--skip-bad"], cwd=tmp_path)  # resumes what the stopped run finished
    try:
        wait_for(lambda: markers() > done_stopped, 120, "a shard more")
        os.kill(beam_workers(started.process.pid)[0], signal.SIGKILL)
        killed = started.finish(timeout=60)
    finally:
        kill_tree(started.process.pid)
    assert killed.returncode == 1
    assert killed.stderr.strip().splitlines()[-1].startswith("error: the Beam pipeline failed: ")
    assert not (out / "manifest.json").exists()
    total = len(dataset_files(tmp_path / "local" / "noise")) // 3  # shard, index, marker each
    done_killed = markers()
    assert done_stopped < done_killed < total

    again = run_cli([*beam_args, "--skip-bad"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    kept = int(re.search(r"\((\d+) kept from an earlier run\)", again.stdout).group(1))
    assert kept >= done_killed and f"shards kept {kept}," in again.stdout
    assert f"shards written {total - kept}" in again.stdout
    assert "48 x undecodable image" in again.stdout  # the report: every shard's marker
    counted = int(re.search(r"skipped: undecodable image (\d+)", again.stdout).group(1))  # this run's shards
    assert 1 <= counted <= 48
    for name in ("benign/broken0.png", "benign/broken47.png"):
        assert privacy.image_id(KEY, name) in again.stdout
    assert_same_dataset(tmp_path / "local" / "noise", out)


@pytest.mark.slow
def test_inputs_and_outputs_in_a_bucket_on_beam_equal_local_ones(gcs_bucket, tmp_path, monkeypatch):
    """Folder, CSV, MedMNIST, DICOM and NIfTI inputs read from gs:// and written to gs:// by the Beam
    workers give the local files (NIfTI ids hash the volume's path, so its pixels are compared)."""
    local = tmp_path / "in"
    _noise_folder(local / "folder", count=12, size=16)
    (local / "folder.csv").write_text("path,label\n" + "".join(
        f"folder/{c}/img{i:04d}.png,{c}\n" for i in range(12) for c in [("benign", "malignant")[i % 2]]))
    rng = np.random.default_rng(1)
    np.savez(local / "breastmnist.npz", train_images=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (10, 1)))
    for i in range(4):
        make_dicom(local / "dicom" / f"series{i % 2}" / f"slice{i}", rng.integers(-1000, 2000, (8, 8), dtype=np.int16))
    nib.save(nib.Nifti1Image(rng.integers(-1000, 2000, (8, 8, 4)).astype(np.int16), np.eye(4)), local / "v.nii.gz")
    bucket_in = f"{gcs_bucket}/in"
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload(path, f"{bucket_in}/{path.relative_to(local).as_posix()}")

    def sources(root):
        return {
            "folder": ImageFolderSource(f"{root}/folder", modality="derm"),
            "csv": CsvSource(f"{root}/folder.csv", modality="derm"),
            "breastmnist": MedMnistSource(f"{root}/breastmnist.npz"),
            "dicom": DicomSource(f"{root}/dicom", modality="ct", windows=WINDOWS),
            "nifti": NiftiSource(f"{root}/v.nii.gz", windows=WINDOWS),
        }

    def options(out, dataset):
        return ConvertOptions(dataset=dataset, out_dir=out, shard_size=3, progress=False)

    for dataset, source in sources(local).items():
        convert(source, KEY, options(tmp_path / "out", dataset))
    monkeypatch.chdir(tmp_path)
    out = f"{gcs_bucket}/out"
    beam_convert.run([(s, options(out, d)) for d, s in sources(bucket_in).items()], functools.partial(bytes, KEY),
                     beam_convert.pipeline_options(TWO_WORKERS, 2))
    for dataset in ("folder", "csv", "breastmnist", "dicom"):
        expected = dataset_files(tmp_path / "out" / dataset)
        assert sorted(storage.list_sizes(f"{out}/{dataset}")) == sorted(expected)
        with ThreadPoolExecutor(8) as pool:  # the emulator answers each request in about 0.1 s
            got = dict(zip(expected, pool.map(lambda name: storage.read_bytes(f"{out}/{dataset}/{name}"), expected)))
        assert [name for name in expected if got[name] != expected[name]] == []
    shard = "nifti/train-00000-of-00001.tfrecord"
    images = [[records.decode_example(payload)["image"] for _, payload in records.iter_records(path)]
              for path in (tmp_path / "out" / shard, f"{out}/{shard}")]
    assert len(images[0]) == 4 and images[0] == images[1]


def test_options_come_from_beam_options_alone(monkeypatch):
    """Worker processes here by default (no Prism download), a cluster's runner untouched, and
    never this process's argv, which names the source."""
    monkeypatch.setattr(sys, "argv", ["convert", "dicom", "/data/Doe_Jane", "--temp_location=/data/Doe_Jane"])
    local = beam_convert.pipeline_options([], 3).get_all_options(drop_default=True)
    assert local == {"runner": "FnApiRunner", "direct_num_workers": 3, "direct_running_mode": "multi_processing"}
    dataflow = beam_convert.pipeline_options(["--runner=DataflowRunner", "--region=r"], 3)
    assert dataflow.get_all_options(drop_default=True) == {"runner": "DataflowRunner", "region": "r"}
    # Runner names as Beam takes them (create_runner: any case, "Runner" optional, a dotted path).
    for spelling in ("direct", "directrunner", "DIRECTRUNNER", "FnApi", "fnapirunner",
                     "apache_beam.runners.direct.direct_runner.DirectRunner"):
        options = beam_convert.pipeline_options([f"--runner={spelling}"], 3).get_all_options(drop_default=True)
        assert options["direct_num_workers"] == 3 and options["runner"] == spelling
    for spelling in DATAFLOW_SPELLINGS:
        assert beam_convert.runner_name(PipelineOptions([f"--runner={spelling}"])) == "DataflowRunner"


DATAFLOW_SPELLINGS = ("DataflowRunner", "dataflow", "DataFlow", "dataflowrunner",
                      "apache_beam.runners.dataflow.dataflow_runner.DataflowRunner")


@pytest.mark.parametrize("runner", DATAFLOW_SPELLINGS)
def test_dataflow_is_refused_local_locations_before_submitting(tmp_path, capsys, monkeypatch, runner):
    """Refused before anything is read (the gs:// inputs here exist nowhere), each local path named."""
    monkeypatch.delenv(privacy.KEY_ENV, raising=False)
    root = _noise_folder(tmp_path / "folder", count=2, size=8)
    dataflow = f"--beam-options=--runner={runner} --project=p --region=r --temp_location=gs://b/t"
    common = ["--modality", "derm", "--dataset", "f", "--runner=beam", dataflow]
    key = str(_key_file(tmp_path))
    assert cli.main(["folder", str(root), *common, "--out", "gs://b/out", "--id-key-file", key]) == 1
    assert capsys.readouterr().err == (f"error: root {root}, --id-key-file {key}: local paths, which Dataflow's "
                                       "workers cannot reach; give gs:// URLs\n")
    assert cli.main(["folder", "gs://b/in", *common, "--out", str(tmp_path / "out"), "--id-key-file", "gs://b/k"]) == 1
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'out'}: a local path, which Dataflow's workers "
                                       "cannot reach; give a gs:// URL\n")
    csv = ["csv", "gs://b/in.csv", *common, "--out", "gs://b/out", "--id-key-file", "gs://b/k"]
    assert cli.main([*csv, "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: --root {tmp_path}: a local path")
    assert cli.main(["dicom", "gs://b/in", *common, "--out", "gs://b/out"]) == 1
    assert capsys.readouterr().err.startswith("error: on Dataflow the workers read the id key from --id-key-file")


def test_a_beam_option_beam_does_not_know_is_refused_by_name(tmp_path, capsys):
    """Beam itself drops what it cannot parse ("Discarding unparseable args") and runs without it."""
    args = ["folder", "gs://b/in", "--modality", "derm", "--dataset", "f", "--out", "gs://b/out",
            "--id-key-file", "gs://b/k", "--runner=beam"]
    mistyped = "--beam-options=--runner=DataflowRunner --project=p --tmp_location=gs://b/t --region r"
    assert cli.main([*args, mistyped]) == 1
    assert capsys.readouterr().err == ("error: --beam-options: --tmp_location=gs://b/t: not a Beam pipeline option "
                                       "(Beam would drop it and run without it); check its spelling in Beam's "
                                       "pipeline options\n")
    with pytest.raises(ConversionError, match=r"^--beam-options: --num_workrs 4 region=r: not a Beam"):
        beam_convert.pipeline_options(["--num_workrs", "4", "region=r"], 1)
    # Every --beam-options of docs/beam.md is Beam's (bash drops a backslash-newline inside quotes).
    documented = re.findall(r'--beam-options="([^"]*)"', (REPOSITORY / "docs" / "beam.md").read_text())
    assert len(documented) == 3
    for flags in documented:
        assert beam_convert.unknown_flags(shlex.split(flags.replace("\\\n", ""))) == []


def test_a_worker_without_the_launching_key_cannot_open_the_job():
    sealed = beam_convert.seal((None, "options"), KEY)
    assert beam_convert.unseal(sealed, KEY) == (None, "options")
    with pytest.raises(ConversionError, match="the worker's id key is not the one the job was launched with"):
        beam_convert.unseal(sealed, bytes(32))


def test_without_beam_the_cli_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "data_pipelines.beam_convert")
    monkeypatch.delattr(data_pipelines, "beam_convert")
    root = _noise_folder(tmp_path / "folder", count=2, size=8)
    code = cli.main(["folder", str(root), "--modality", "derm", "--dataset", "f", "--out", str(tmp_path / "out"),
                     "--id-key-file", str(_key_file(tmp_path)), "--runner=beam"])
    assert code == 1
    err = capsys.readouterr().err
    assert err == ("error: --runner=beam needs Apache Beam, which is not installed: pip install -r "
                   "requirements-beam.txt (or pip install 'mermed-jax[beam]')\n")


# --------------------------------------------------------------------------- privacy audit

def unpacked_pickles(graph: bytes) -> list[bytes]:
    """The pickles inside a serialized job graph: Beam stores each function as base64 of a
    compressed (bz2 or zlib) pickle, which a plain search of the graph would not see into."""
    found = []
    for token in re.findall(rb"[A-Za-z0-9+/]{40,}={0,2}", graph):
        try:
            packed = base64.b64decode(token, validate=True)
        except ValueError:
            continue
        for unpack in (bz2.decompress, zlib.decompress):
            try:
                found.append(unpack(packed))
                break
            except (OSError, ValueError, zlib.error):
                continue
    return found


class _BrokenDicom(DicomSource):
    """A DICOM folder whose files fail to load as no source expects, the error naming the file."""

    def load(self, item):
        raise OSError(f"{item.ref}: input/output error")


@pytest.mark.realdata
@pytest.mark.slow
def test_privacy_audit_on_beam(realdata, tmp_path, capfd, caplog, monkeypatch):
    """Nothing the Beam path writes, prints, logs or counts, nor its job graph, options or temp
    location, holds a DICOM tag value, a source location or file name, or the key: with a DICOM
    folder and a CSV named after people, a bad input skipped and counted, and an unexpected error
    on a worker."""
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)  # this process's workers import the installed package, not the repository
    sources, out, temp = tmp_path / "sources", tmp_path / "out", tmp_path / "beam_temp"
    temp.mkdir()
    key_file = tmp_path / "keys" / "id.key"
    key_file.parent.mkdir()
    assert cli.main(["new-key", str(key_file)]) == 0
    key = privacy.load_key(key_file)
    folders = {"ct": sources / "Doe_Jane", "us": sources / "us", "cxr": sources / "cxr"}
    secrets = {"Doe_Jane", "Smith_John", "Mustermann_Max", "Roe_Richard"}
    for modality, names in GROUPS.items():
        folders[modality].mkdir(parents=True)
        for name in names:
            shutil.copy(realdata / "dicom_samples" / name, folders[modality] / name)
            secrets |= identifying_strings(folders[modality] / name)
    no_pixels = folders["ct"] / "NOPIXELS_Doe_Jane.dcm"  # a bad input, skipped and counted
    make_dicom(no_pixels, np.zeros((4, 4), np.int16), with_pixels=False)
    secrets |= identifying_strings(no_pixels)
    # A CSV named after one person listing images named after another, under a folder named after a third.
    csv_root = _noise_folder(sources / "Mustermann_Max", count=4, size=8)
    for image in csv_root.rglob("*.png"):
        image.rename(image.with_name(f"Roe_Richard_{image.name}"))
    csv_file = sources / "Smith_John.csv"
    csv_file.write_text("path,label\n" + "".join(f"{p.relative_to(csv_root)},{p.parent.name}\n"
                                                for p in sorted(csv_root.rglob("*.png"))))
    flags = f"--temp_location={temp} --direct_num_workers=2 --direct_running_mode=multi_processing"
    common = ["--out", str(out), "--id-key-file", str(key_file), "--splits", "train=1.0", "--no-progress",
              "--skip-bad", "--runner=beam", f"--beam-options={flags}"]
    argvs = {modality: ["dicom", str(folders[modality]), "--modality", modality, "--dataset", f"dicom_{modality}",
                        *common, *(["--channels", "3"] if modality == "us" else [])] for modality in GROUPS}
    argvs["csv"] = ["csv", str(csv_file), "--root", str(csv_root), "--modality", "derm", "--dataset", "people", *common]
    parsed = {name: cli.build_parser().parse_args(argv) for name, argv in argvs.items()}
    jobs = {name: (cli.make_source(args), cli._options(args, args.dataset)) for name, args in parsed.items()}
    load_key = functools.partial(privacy.load_key, str(key_file))

    # The CT folder through the CLI in a process of its own; the rest in one pipeline run here by the
    # CLI's own functions, its workers logging to this process's stderr.
    done = run_cli(argvs["ct"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [done.stdout, done.stderr]
    capfd.readouterr()
    cli._run_beam([jobs[name] for name in ("us", "cxr", "csv")], load_key, cli._beam_options(parsed["csv"]))
    printed += list(capfd.readouterr())
    assert "skipped: DICOM without pixel data 1" in printed[0] and "SDK Harness" in printed[1]  # workers' logs
    assert "people: 4 records" in printed[2] and "SDK Harness" in printed[3]
    # An unexpected error on a worker (here in this process, where the class above is): the
    # message, the traceback the worker logs and the runner's error name the item by its id only.
    broken = (_BrokenDicom(folders["ct"], modality="ct", windows=WINDOWS),
              ConvertOptions(dataset="broken", out_dir=out, progress=False))
    with pytest.raises(ConversionError, match=r"^the Beam pipeline failed: item [0-9a-f]+: unexpected error "
                                              r"\(OSError\)$") as failed:
        beam_convert.run([broken], load_key, beam_convert.pipeline_options(["--direct_running_mode=in_memory"], 1))
    assert "Traceback" in caplog.text and "unexpected error (OSError)" in caplog.text  # the worker's log
    printed += ["".join(traceback.format_exception(failed.value)), caplog.text, *capfd.readouterr()]
    assert len(secrets) > 50 and {"693_UNCR.dcm", "RG1_J2KI", "NOPIXELS_Doe_Jane", "PID-4711-SECRET"} <= secrets

    options = beam_convert.pipeline_options(flags.split(), 2)
    every_job = [*jobs.values(), broken]
    pipeline = beam_convert.build(every_job, load_key, options)
    graph = pipeline.to_runner_api().SerializeToString()
    shutil.rmtree(pipeline.local_tempdir)  # Beam's own, empty: a pipeline that runs removes it
    pickles = unpacked_pickles(graph)
    assert any(b"data_pipelines.beam_convert" in p and str(key_file).encode() in p for p in pickles)  # seen into
    for name, secret in (("ct", "Doe_Jane"), ("csv", "Smith_John"), ("csv", "Mustermann_Max")):
        assert secret.encode() in pickle.dumps(jobs[name])  # what the graph would hold unsealed
    uploaded = [("job graph", graph), *((f"pickle {i} in the job graph", p) for i, p in enumerate(pickles)),
                ("options", repr(options.get_all_options(drop_default=True)).encode())]  # the rest are Beam's
    uploaded += [(str(p), p.read_bytes()) for p in sorted(temp.rglob("*")) if p.is_file()]
    uploaded += [(str(p), p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()]
    uploaded += [(f"file name {p}", str(p.relative_to(tmp_path)).encode()) for p in out.rglob("*")]
    uploaded += [(f"printed or logged text {i}", text.encode()) for i, text in enumerate(printed)]
    needles = {s: s.encode() for s in secrets} | {"the key": key, "the key in hex": key.hex().encode()}
    assert [f"{name} in {where}" for name, needle in needles.items() for where, blob in uploaded
            if needle in blob] == []
