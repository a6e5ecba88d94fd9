"""Every location the project reads or writes, local or in a bucket, through one layer.

A location is a local path (including a gcsfuse mount such as /gcs/bucket/...) or a URL: gs://
(gcsfs) or s3:// (s3fs). `path()` returns an etils.epath.Path, the type Orbax and Grain's
checkpoint handler use as well, so checkpoints, manifests, metrics, evaluation outputs and
exports share one implementation and one configuration. epath would route bucket URLs through
tf.io.gfile when tensorflow is importable (clu needs it); gfile's GCS client cannot be pointed
at another endpoint and it has no s3 at all, so this module turns that off for the process before
epath decides (EPATH_USE_TF=false) and epath uses fsspec.

Credentials come from each library's usual chain: Application Default Credentials or the
metadata server for gs:// (gcsfs), AWS environment variables, profiles or the instance role for
s3:// (s3fs/botocore). Nothing here logs or stores them. Endpoints for emulators come from the
libraries' own variables: STORAGE_EMULATOR_HOST (gcsfs), TENSORSTORE_GCS_HTTP_URL (Orbax's
TensorStore), AWS_ENDPOINT_URL (s3fs).

Object stores have no rename and no append: `write_bytes` puts a whole object (an upload becomes
visible only when complete) and, locally, writes a temporary file and renames it, so a reader never
sees half an object anywhere. Transient failures (HTTP 408/429/5xx, resets, timeouts) are retried
with backoff a bounded number of times; the error that gives up names the object.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

os.environ["EPATH_USE_TF"] = "false"  # before epath's first bucket path (it caches the choice)
# gcsfs 2026.10 defaults to an experimental file system that asks each bucket's layout over gRPC
# (zonal and hierarchical-namespace buckets); the classic one is what the tests exercise against
# the emulator, which has no gRPC. A user may still opt in by setting the variable.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec.config  # noqa: E402
from etils import epath  # noqa: E402

# gcsfs and s3fs cache folder listings for the life of the process by default. Several processes
# share a workdir (hosts saving checkpoints, a job and `evaluate --watch`), so a cached listing
# would hide another process's new checkpoint: a resume or a watch would then read a stale step.
for _protocol in ("gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

REMOTE_SCHEMES = ("gs://", "s3://")
# Attempts of this layer. The client libraries retry inside each: gcsfs 6 times with backoff
# (about 31 s), botocore 4 to 5 times; so a storm of transient errors is ridden out for about
# 1.5 minutes per object before a StorageError names it.
RETRY_ATTEMPTS = 3
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


class StorageError(OSError):
    """A location that cannot be read or written; the message names it and says why."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for bucket URLs (gs://, s3://); False for local paths, gcsfuse mounts included.

    Any other `scheme://` (gcs://, s3a://, az://, a typo) is refused rather than taken for a local
    folder named "gcs:", which would silently keep a pod's outputs on one host's disk.
    """
    text = os.fspath(location)
    if text.startswith(REMOTE_SCHEMES):
        return True
    if "://" in text:
        raise StorageError(f"{text}: unsupported location scheme {text.split('://', 1)[0]!r}: "
                           "use gs://, s3:// or a local path (gcsfuse mounts such as /gcs/bucket too)")
    return False


def path(location: str | os.PathLike) -> epath.Path:
    """The location as an epath.Path (absolute when local, so Orbax accepts it)."""
    if isinstance(location, epath.Path) and is_remote(location):
        return location
    text = os.fspath(location)
    return epath.Path(text) if is_remote(text) else epath.Path(os.path.abspath(text))


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` as a string, for any kind of location."""
    return os.fspath(path(location).joinpath(*parts))


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it): for ranged reads, which epath does not offer."""
    import fsspec  # noqa: PLC0415 - only readers of bucket shards need it

    fs, inner = fsspec.core.url_to_fs(os.fspath(location))
    return fs, inner


def _status(error: BaseException) -> int | None:
    """The HTTP status of a client error, whichever library raised it."""
    for attribute in ("code", "status", "status_code"):
        value = getattr(error, attribute, None)
        if isinstance(value, int):
            return value
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def is_transient(error: BaseException) -> bool:
    """Worth retrying: throttling, server errors, dropped or timed-out connections."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    status = _status(error)
    if status is not None:
        return status in _RETRY_STATUS
    # aiohttp's and botocore's connection errors, matched by name along the class hierarchy so that
    # their subclasses (ClientConnectorError, ConnectTimeoutError, ...) count as well.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "ServerTimeoutError",
                         "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                         "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError"})


def first_line(error: BaseException) -> str:
    """"Type: first line of the message" (at most 400 characters): client libraries and TensorStore
    put pages of detail after it, which would bury the location an error message leads with."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:400] if text else ''}"


def explain(error: BaseException, location: str | os.PathLike, doing: str) -> StorageError:
    """A StorageError naming the location, what was being done and the cause in one line."""
    status = _status(error)
    if isinstance(error, FileNotFoundError) or status == 404:
        reason = "not found (a missing object, folder or bucket)"
    elif isinstance(error, PermissionError) or status in (401, 403) or str(error).startswith("Forbidden"):
        reason = "access denied: the job's credentials lack permission (see README: permissions)"
    else:
        reason = first_line(error)
    return StorageError(f"{os.fspath(location)}: {doing} failed: {reason}")


def retrying(fn: Callable[[], _T], location: str | os.PathLike, doing: str, base_delay: float = 1.0) -> _T:
    """fn() retried RETRY_ATTEMPTS times on transient errors with jittered exponential backoff (1 s,
    2 s, ... capped at 10 s); any other error, or the last transient one, is raised as a
    StorageError naming the location."""
    attempts = RETRY_ATTEMPTS
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - each client library raises its own types
            if not is_transient(e) or attempt == attempts - 1:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise explain(e, location, doing + tries) from e
            delay = min(10.0, base_delay * 2**attempt) * (0.5 + random.random())
            logging.warning("%s: %s: transient %s; retrying in %.1f s", os.fspath(location), doing,
                            type(e).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_range(location: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object or file: one ranged request for a bucket object."""
    text = os.fspath(location)
    if not is_remote(text):
        with open(text, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, inner = filesystem(text)
    return retrying(lambda: fs.cat_file(inner, start=start, end=end), text, f"reading bytes {start}-{end}")


def read_bytes(location: str | os.PathLike) -> bytes:
    text = os.fspath(location)
    if not is_remote(text):
        return path(text).read_bytes()
    return retrying(lambda: path(text).read_bytes(), text, "reading")


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def size(location: str | os.PathLike) -> int:
    text = os.fspath(location)
    if not is_remote(text):
        return os.path.getsize(text)
    fs, inner = filesystem(text)
    return int(retrying(lambda: fs.size(inner), text, "reading the size"))


def _replace_locally(target: epath.Path, fill: Callable[[epath.Path], Any]) -> None:
    """fill(temporary) beside `target`, then a rename onto it; a failure (a full disk) leaves
    neither a temporary nor half a target behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fill(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Writes a whole object or file, never visible half-written (see module docstring)."""
    target = path(location)
    if is_remote(target):
        # The whole bytes in one call: one request up to gcsfs's 50 MB chunk, no file object.
        fs, inner = filesystem(target)
        retrying(lambda: fs.pipe_file(inner, bytes(data)), target, "writing")
        return
    _replace_locally(target, lambda temporary: temporary.write_bytes(data))


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def makedirs(location: str | os.PathLike) -> None:
    """Creates a local folder (and parents); buckets have no folders, so for them it is a no-op."""
    if not is_remote(location):
        path(location).mkdir(parents=True, exist_ok=True)


def exists(location: str | os.PathLike) -> bool:
    target = path(location)
    return retrying(target.exists, target, "checking existence") if is_remote(target) else target.exists()


def check_bucket(location: str | os.PathLike, writable: bool) -> None:
    """Fails early, naming the location, when its bucket is missing or the job may not use it.

    Called before anything compiles, so a typo or a missing permission costs seconds, not a
    compile and a first checkpoint. `location` is a folder: writing is checked with a small probe
    object inside it, then deleted (IAM conditions may grant a prefix rather than the bucket).
    """
    if not is_remote(location):
        return
    text = os.fspath(location).rstrip("/")
    scheme, rest = text.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    fs, inner = filesystem(bucket)
    try:
        found = fs.exists(inner)
    except Exception as e:  # noqa: BLE001
        raise explain(e, bucket, "checking the bucket") from e
    if not found:
        raise StorageError(f"{text}: bucket {bucket} does not exist (or the job's credentials cannot see it)")
    if writable:
        probe = filesystem(f"{text}/.mermed-write-check-{uuid.uuid4().hex[:8]}")[1]
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001
            raise explain(e, text, "writing a probe object") from e


def listdir(location: str | os.PathLike) -> list[str]:
    """Names directly under a folder or bucket prefix, sorted; [] when there is none (a bucket has
    no empty folders, so a missing prefix and an empty one look alike)."""
    target = path(location)

    def names() -> list[str]:
        return sorted(p.name for p in target.iterdir()) if target.is_dir() else []

    return retrying(names, target, "listing") if is_remote(target) else names()


def remove(location: str | os.PathLike) -> None:
    """Deletes one file or object; one already gone is not an error."""
    target = path(location)

    if is_remote(target):
        retrying(lambda: target.unlink(missing_ok=True), target, "deleting")
    else:
        target.unlink(missing_ok=True)


def upload_tree(local_dir: str | os.PathLike, location: str | os.PathLike) -> list[str]:
    """Copies every file under a local folder to the same relative names under `location` (for
    outputs that only a local-file library can write, such as jax.profiler's traces); returns the
    locations written."""
    root = os.fspath(local_dir)
    written = []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            source = os.path.join(folder, name)
            target = join(location, *os.path.relpath(source, root).split(os.sep))
            upload(source, target)
            written.append(target)
    return written


def read_ranges(locations: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    """Bytes [starts[i], ends[i]) of locations[i] for every i, the bucket reads all in flight at once.

    One ranged request per range, issued together on the client's event loop (fsspec cat_ranges),
    so a batch of records costs about one round trip rather than one per record. A range whose
    request failed transiently is read again through `read_range` (with its retries); any other
    failure raises a StorageError naming the object.
    """
    out: list[bytes | None] = [None] * len(locations)
    remote: dict[int, tuple[Any, list[int], list[str]]] = {}  # per file system: it, indices, inner paths
    for i, location in enumerate(locations):
        if is_remote(location):
            fs, inner_path = filesystem(location)
            group = remote.setdefault(id(fs), (fs, [], []))
            group[1].append(i)
            group[2].append(inner_path)
        else:
            out[i] = read_range(location, starts[i], ends[i])
    for fs, members, inner in remote.values():
        got = fs.cat_ranges(inner, [starts[i] for i in members], [ends[i] for i in members], on_error="return")
        for i, result in zip(members, got):
            if not isinstance(result, BaseException):
                out[i] = result
            elif is_transient(result):
                out[i] = read_range(locations[i], starts[i], ends[i])
            else:
                raise explain(result, locations[i], f"reading bytes {starts[i]}-{ends[i]}")
    return out  # type: ignore[return-value]  # every slot is filled above


def list_sizes(location: str | os.PathLike) -> dict[str, int]:
    """{name: size in bytes} of the files or objects directly in a folder, from one listing (paged
    by the client); {} when the folder does not exist."""
    text = os.fspath(location)
    if not is_remote(text):
        if not os.path.isdir(text):
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(text) if e.is_file()}
    fs, inner = filesystem(text)

    def listing() -> list[dict[str, Any]]:
        try:
            return fs.ls(inner, detail=True, refresh=True)
        except FileNotFoundError:
            return []

    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"])
            for e in retrying(listing, text, "listing") if e["type"] == "file"}


def files_under(location: str | os.PathLike) -> list[epath.Path]:
    """Every file below a folder or bucket prefix, at any depth, sorted as paths sort (component by
    component). A bucket is listed recursively in one paged listing, not asked about each object."""
    text = os.fspath(location)
    if not is_remote(text):
        return sorted(path(p) for p in pathlib.Path(text).rglob("*") if p.is_file())
    fs, inner = filesystem(text)
    scheme = text.split("://", 1)[0]
    return sorted(path(f"{scheme}://{name}") for name in retrying(lambda: fs.find(inner), text, "listing"))


@contextlib.contextmanager
def local_file(location: str | os.PathLike) -> Iterator[str]:
    """A local path holding the file, for libraries that open only local files (nibabel): the file
    itself, or a temporary copy of a bucket object, deleted afterwards."""
    text = os.fspath(location)
    if not is_remote(text):
        yield text
        return
    with tempfile.TemporaryDirectory(prefix="mermed-input-") as folder:
        copy = os.path.join(folder, path(text).name)
        fs, inner = filesystem(text)
        retrying(lambda: fs.get_file(inner, copy), text, "downloading")
        yield copy


def upload(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copies a finished local file to `location`, streamed (traces and shards can be large) and
    never visible half-written: an upload to a bucket, a copy and rename locally."""
    source, text = os.fspath(local_file), os.fspath(location)
    if is_remote(text):
        fs, inner = filesystem(text)
        retrying(lambda: fs.put_file(source, inner), text, "uploading")
        return
    _replace_locally(path(text), lambda temporary: shutil.copyfile(source, temporary))


def publish(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    """Moves a finished local file to `location`: a rename locally, an upload (visible only once
    complete) to a bucket, after which the local file is removed."""
    source, text = os.fspath(local_file), os.fspath(location)
    if not is_remote(text):
        os.replace(source, text)
        return
    upload(source, text)
    os.remove(source)
