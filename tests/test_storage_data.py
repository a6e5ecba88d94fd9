"""Converted datasets in buckets (GCS emulator behind the fault proxy, moto's S3): conversion, resume,
the training and evaluation pipelines, one ranged request per record, faults and their errors."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from data_pipelines import convert as cli
from data_pipelines import eval_pipeline, record_source, records, storage
from data_pipelines import manifest as mf
from data_pipelines.multicrop import MultiCropConfig
from data_pipelines.pipeline import TrainConfig, train_iterator
from data_pipelines.shard_writer import ConvertOptions, convert
from data_pipelines.sources.synthetic import SyntheticSource, write_demo_data

KEY = bytes(range(32))
TINY = MultiCropConfig(global_size=16, local_size=8, num_local=2)


def _options(out, **kw) -> ConvertOptions:
    return ConvertOptions(dataset="syn", out_dir=out, shard_size=5, progress=False, **kw)


def _convert(out, modality: str = "derm", count: int = 20, **kw):
    return convert(SyntheticSource(modality, count=count, size=16, seed=0), KEY, _options(out, **kw))


def _cfg(dirs, **kw) -> TrainConfig:
    defaults = dict(crops=TINY, read_threads=0, prefetch=1, shuffle_window=4, cycle_length=2, per_device_batch=6)
    return TrainConfig(dirs=tuple(dirs), **{**defaults, **kw})


def _batches(dirs, n: int, **kw) -> list[dict[str, np.ndarray]]:
    iterator = train_iterator(_cfg(dirs, **kw), process_index=0, process_count=1, local_devices=1)
    try:
        return [next(iterator) for _ in range(n)]
    finally:
        iterator.close()


def _assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _same_files(local: pathlib.Path, remote: str) -> None:
    """Every file of the local dataset directory, byte for byte, in the bucket's (state files aside)."""
    names = sorted(p.name for p in local.iterdir() if not p.name.startswith("."))
    assert sorted(n for n in storage.list_sizes(remote) if not n.startswith(".")) == names
    for name in names:
        assert storage.read_bytes(storage.join(remote, name)) == (local / name).read_bytes(), name


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_conversion_into_a_bucket_resumes_writes_the_manifest_last_and_equals_local(scheme, tmp_path, request):
    bucket = request.getfixturevalue("gcs_bucket" if scheme == "gs" else "s3_bucket")
    reference = _convert(tmp_path)
    out = f"{bucket}/data"

    class Interrupt(Exception):
        pass

    finished = []

    def interrupt_after_two(result):
        finished.append(result.name)
        if len(finished) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        convert(SyntheticSource("derm", count=20, size=16, seed=0), KEY, _options(out), on_shard=interrupt_after_two)
    written = storage.list_sizes(f"{out}/syn")
    assert mf.MANIFEST_NAME not in written and sum(n.endswith(".tfrecord") for n in written) == 2
    with pytest.raises(FileNotFoundError, match="no manifest"):
        mf.load_manifest(f"{out}/syn")

    order = []
    real_write = storage.write_bytes

    def recording_write(location, data):
        order.append(os.fspath(location).rsplit("/", 1)[-1])
        real_write(location, data)

    request.getfixturevalue("monkeypatch").setattr(storage, "write_bytes", recording_write)
    resumed = _convert(out)
    assert resumed.reused_shards == 2 and resumed.total_shards == reference.total_shards
    assert order[-1] == mf.MANIFEST_NAME  # after every index (and so every shard) of this run
    assert sum(n.endswith(".index") for n in order) == reference.total_shards - 2
    assert resumed.manifest == reference.manifest and str(resumed.manifest.directory) == f"{out}/syn"
    _same_files(tmp_path / "syn", f"{out}/syn")
    mf.verify_shards(mf.load_manifest(f"{out}/syn"))
    again = _convert(out)
    assert again.reused_shards == again.total_shards


def test_worker_processes_write_into_a_bucket(gcs_bucket, tmp_path):
    reference = _convert(tmp_path, count=30)
    parallel = _convert(f"{gcs_bucket}/p", count=30, workers=2)
    assert parallel.manifest == reference.manifest
    _same_files(tmp_path / "syn", f"{gcs_bucket}/p/syn")


def test_cli_converts_into_a_bucket_with_a_key_object(gcs_bucket, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "src" / cls / f"{i}.png").write_bytes(
                records.encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    key = f"{gcs_bucket}/keys/id.key"
    assert cli.main(["new-key", key]) == 0
    with pytest.raises(FileExistsError, match="id.key"):
        cli.main(["new-key", key])
    args = ["folder", str(tmp_path / "src"), "--modality", "derm", "--dataset", "f", "--workers", "1",
            "--no-progress", "--shard-size", "2"]
    assert cli.main([*args, "--out", f"{gcs_bucket}/out", "--id-key-file", key]) == 0
    assert "f: 6 records in 3 shards" in capsys.readouterr().out
    assert cli.main([*args, "--out", f"{gcs_bucket}/keys", "--id-key-file", key]) == 1
    assert "inside the output" in capsys.readouterr().err
    local_key = tmp_path / "id.key"
    local_key.write_bytes(storage.read_bytes(key))
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--id-key-file", str(local_key)]) == 0
    _same_files(tmp_path / "out" / "f", f"{gcs_bucket}/out/f")


@pytest.fixture
def two_datasets(tmp_path, gcs_bucket) -> tuple[list[str], list[str]]:
    """The same two converted datasets on local disk and in a gs:// bucket."""
    local, remote = [], []
    for modality in ("derm", "cxr"):
        report = convert(SyntheticSource(modality, count=14, size=16, seed=1), KEY,
                         ConvertOptions(dataset=modality, out_dir=tmp_path, shard_size=4, progress=False))
        local.append(str(tmp_path / modality))
        remote.append(f"{gcs_bucket}/{modality}")
        for name in os.listdir(local[-1]):
            storage.write_bytes(f"{remote[-1]}/{name}", (tmp_path / modality / name).read_bytes())
        assert report.manifest.splits["train"].shards[0].index is not None
    return local, remote


def test_train_pipeline_reads_a_bucket_like_local_disk_one_request_per_record(two_datasets, object_stores):
    local, remote = two_datasets
    expected = _batches(local, 3)
    iterator = train_iterator(_cfg(remote), process_index=0, process_count=1, local_devices=1)
    try:
        object_stores.proxy.requests = 0
        batches = [next(iterator) for _ in range(3)]
        assert object_stores.proxy.requests == 3 * 6  # one ranged GET per record, nothing else
    finally:
        iterator.close()
    _assert_batches_equal(batches, expected)
    # Grain's threads and worker processes read the bucket too, with the same batches.
    _assert_batches_equal(_batches(remote, 3, read_threads=3, prefetch=2), expected)


def test_train_pipeline_worker_processes_read_a_bucket(two_datasets):
    local, remote = two_datasets
    _assert_batches_equal(_batches(remote, 2, worker_count=1), _batches(local, 2))


def test_eval_pipeline_reads_a_bucket_like_local_disk(tmp_path, gcs_bucket):
    batches = []
    for out in (tmp_path, gcs_bucket):
        _convert(out, "cxr", 12, fractions={"test": 1.0})
        cfg = eval_pipeline.EvalConfig(dirs=(storage.join(out, "syn"),), split="test", image_size=8, batch_size=5,
                                       read_threads=0)
        batches.append(list(eval_pipeline.eval_batches(cfg, process_index=0, process_count=1)))
    _assert_batches_equal(batches[1], batches[0])


def _without_indexes(directory: pathlib.Path) -> None:
    """Turns a conversion into one made before indexes existed: a version 1 manifest, no .index files."""
    manifest = json.loads((directory / mf.MANIFEST_NAME).read_text())
    manifest["version"] = 1
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            (directory / shard.pop("index")).unlink()
            del shard["num_bytes"]
    (directory / mf.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_shards_without_an_index_are_scanned_through_storage(tmp_path, gcs_bucket, s3_bucket):
    """A directory converted before indexes existed reads the same from a bucket."""
    write_demo_data(tmp_path, images_per_modality=16, size=32, seed=0, shard_size=8)
    local = tmp_path / "demo_us"
    _without_indexes(local)
    assert mf.load_manifest(local).splits["train"].shards[0].index is None
    dirs = []
    for bucket in (gcs_bucket, s3_bucket):
        for name in os.listdir(local):
            storage.write_bytes(f"{bucket}/us/{name}", (local / name).read_bytes())
        dirs.append(f"{bucket}/us")
    expected = _batches([str(local)], 2)
    for remote in dirs:
        _assert_batches_equal(_batches([remote], 2), expected)


def test_a_stale_index_is_not_trusted(two_datasets, caplog):
    """A shard rewritten after its index was made (another size) is scanned; an index that
    disagrees with the manifest is refused, naming it."""
    local, remote = two_datasets
    manifest = mf.load_manifest(remote[0])
    shard = manifest.splits["train"].shards[0]
    storage.write_bytes(f"{remote[0]}/{shard.file}", storage.read_bytes(f"{remote[0]}/{shard.file}") + b"\0")
    files = record_source.manifest_shard_files(manifest, "train")
    assert files[0].index is None and "scanning its records" in caplog.text
    with pytest.raises(records.CorruptRecordError, match=shard.file):
        record_source.index_shard(files[0])
    bad = record_source.ShardFile(files[1].path, files[1].num_records + 1, files[1].index, files[1].num_bytes)
    with pytest.raises(ValueError, match=rf"{files[1].index}: not the index of"):
        record_source.index_shard(bad)


def test_a_503_storm_is_ridden_out(two_datasets, object_stores):
    local, remote = two_datasets
    expected = _batches(local, 2)
    iterator = train_iterator(_cfg(remote), process_index=0, process_count=1, local_devices=1)
    try:
        object_stores.proxy.fail_next = 8
        batches = [next(iterator) for _ in range(2)]
    finally:
        iterator.close()
    assert object_stores.proxy.injected["503"] == 8
    _assert_batches_equal(batches, expected)


def test_a_shard_deleted_mid_run_is_an_error_naming_it_even_when_skipping(two_datasets):
    _, remote = two_datasets
    iterator = train_iterator(_cfg(remote, skip_corrupt=True), process_index=0, process_count=1, local_devices=1)
    try:
        next(iterator)
        for directory in remote:
            for name in storage.list_sizes(directory):
                if name.endswith(".tfrecord"):
                    storage.remove(f"{directory}/{name}")
        with pytest.raises(storage.StorageError, match=r"gs://t-\w+/(derm|cxr)/train-\d{5}-of-\d{5}\.tfrecord: "
                                                       r"reading bytes .* not found"):
            next(iterator)
    finally:
        iterator.close()


def test_missing_bucket_and_denied_requests_name_the_location(two_datasets, object_stores):
    _, remote = two_datasets
    with pytest.raises(storage.StorageError, match="gs://no-such-bucket-x2.*does not exist"):
        train_iterator(_cfg(["gs://no-such-bucket-x2/derm"]), process_index=0, process_count=1, local_devices=1)
    object_stores.proxy.deny = True
    with pytest.raises(storage.StorageError, match=rf"{remote[0]}/manifest.json: .*access denied"):
        train_iterator(_cfg(remote), process_index=0, process_count=1, local_devices=1)
    with pytest.raises(storage.StorageError, match="access denied"):
        _convert(f"{remote[0]}-out")


def test_read_ranges_is_one_request_per_range(gcs_bucket, object_stores):
    target = f"{gcs_bucket}/blob"
    storage.write_bytes(target, bytes(range(200)))
    object_stores.proxy.requests = 0
    got = storage.read_ranges([target] * 4, [0, 10, 50, 199], [5, 20, 60, 200])
    assert got == [bytes(range(0, 5)), bytes(range(10, 20)), bytes(range(50, 60)), bytes([199])]
    assert object_stores.proxy.requests == 4
