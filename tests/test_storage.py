"""The path layer (data_pipelines/storage.py) on a local disk, the GCS emulator and moto's S3."""
import pathlib

import pytest

from data_pipelines import storage


@pytest.fixture(params=["local", "gs", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue(f"{'gcs' if request.param == 'gs' else 's3'}_bucket") + "/root"


def test_write_read_range_and_list(location):
    target = storage.join(location, "dir", "blob.bin")
    storage.write_bytes(target, bytes(range(256)))
    assert storage.read_bytes(target) == bytes(range(256))
    assert storage.read_range(target, 10, 20) == bytes(range(10, 20))
    assert storage.size(target) == 256
    assert storage.exists(target) and not storage.exists(storage.join(location, "dir", "other"))
    assert [p.name for p in storage.path(storage.join(location, "dir")).iterdir()] == ["blob.bin"]


def test_missing_object_is_named(location):
    missing = storage.join(location, "nothing-here.bin")
    with pytest.raises(OSError, match="nothing-here.bin"):  # StorageError for buckets, the OS error locally
        storage.read_range(missing, 0, 4)


def test_rides_out_503s_and_resets(gcs_bucket, object_stores):
    target = f"{gcs_bucket}/a.bin"
    storage.write_bytes(target, b"0123456789")
    object_stores.proxy.fail_next = 3
    object_stores.proxy.reset_next = 1
    assert storage.read_range(target, 2, 5) == b"234"
    assert object_stores.proxy.injected["503"] == 3 and object_stores.proxy.injected["reset"] == 1


@pytest.mark.long  # gcsfs's own backoff makes giving up take about a minute
def test_gives_up_naming_the_object(gcs_bucket, object_stores, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 2)  # with gcsfs's own 6 inside each: about a minute
    target = f"{gcs_bucket}/b.bin"
    storage.write_bytes(target, b"0123456789")
    object_stores.proxy.fail_next = 10_000
    with pytest.raises(storage.StorageError, match=r"b\.bin: reading bytes 0-4 .*after \d+ attempts"):
        storage.read_range(target, 0, 4)


def test_missing_bucket_and_denied_requests_fail_early(gcs_bucket, object_stores):
    with pytest.raises(storage.StorageError, match="gs://no-such-bucket-x1.*does not exist"):
        storage.check_bucket("gs://no-such-bucket-x1/run", writable=True)
    object_stores.proxy.deny = True
    with pytest.raises(storage.StorageError, match="access denied"):
        storage.check_bucket(f"{gcs_bucket}/run", writable=True)


def test_listings_see_other_writers(location):
    """Another process's new object shows at once (a cached listing once hid a new checkpoint)."""
    import fsspec  # noqa: PLC0415

    folder = storage.join(location, "steps")
    storage.write_bytes(storage.join(folder, "1"), b"")
    assert storage.listdir(folder) == ["1"]
    if storage.is_remote(folder):  # a writer that is not this process's file system object
        other, inner = fsspec.core.url_to_fs(folder, skip_instance_cache=True)
        other.pipe_file(f"{inner}/2", b"")
    else:
        storage.write_bytes(storage.join(folder, "2"), b"")
    assert storage.listdir(folder) == ["1", "2"] and storage.exists(storage.join(folder, "2"))


@pytest.mark.parametrize("location", ["gcs://bucket/run", "s3a://bucket/run", "az://c/run"])
def test_other_schemes_are_refused_not_made_local_folders(location, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match="unsupported location scheme"):
        storage.write_bytes(location, b"x")
    assert not list(tmp_path.iterdir())


def test_transient_errors_include_subclasses():
    import aiohttp  # noqa: PLC0415

    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    assert storage.is_transient(aiohttp.ClientConnectorError(key, OSError(111, "refused")))
    assert not storage.is_transient(FileNotFoundError("gone"))


def test_a_failed_local_write_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"

    def full_disk(self, data):
        pathlib.Path(self).write_bytes(data[:1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.epath.Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes(target, b"abc")
    assert list(tmp_path.iterdir()) == []
