"""Image ids that identify nobody: a keyed HMAC of the source path or UID.

A plain hash of a path or DICOM UID can be reversed by anyone who can guess or enumerate the
inputs (UIDs and NIH-style file names are highly structured); a keyed HMAC cannot without the key.
The key lives outside the shards: in a file or bucket object (`--id-key-file`, a local path or a
gs:// or s3:// URL) or the MERMED_ID_KEY environment variable (hex). The same key gives the same ids, so a converted set can be joined back to its
sources by whoever holds the key, and by nobody else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from data_pipelines import storage

KEY_ENV = "MERMED_ID_KEY"
KEY_BYTES = 32
ID_HEX_CHARS = 32  # 128 bits: no collisions in practice, short enough to print


def new_key_file(path: str | os.PathLike) -> str:
    """Creates a fresh random key file (hex; mode 0600 locally, the bucket's permissions govern an
    object); refuses to overwrite an existing one."""
    text = secrets.token_hex(KEY_BYTES) + "\n"
    if storage.is_remote(path):
        if storage.exists(path):
            raise FileExistsError(f"{os.fspath(path)}: exists; refusing to replace an id key")
        storage.write_text(path, text)
        return os.fspath(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return os.fspath(path)


def _parse(text: str, origin: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{origin}: id key must be hex") from None
    if len(key) < 16:
        raise ValueError(f"{origin}: id key has {len(key)} bytes; need at least 16")
    return key


def load_key(key_file: str | os.PathLike | None = None) -> bytes:
    """The HMAC key from `key_file`, else from $MERMED_ID_KEY; the error says how to make one."""
    if key_file is not None:
        return _parse(storage.read_text(key_file), os.fspath(key_file))
    if os.environ.get(KEY_ENV):
        return _parse(os.environ[KEY_ENV], f"${KEY_ENV}")
    raise ValueError(
        f"no id key: pass --id-key-file or set ${KEY_ENV}; create a key file with "
        "`python -m data_pipelines.convert new-key PATH` and keep it outside the output directory"
    )


def check_key_outside(key_file: str | os.PathLike | None, out_dir: str | os.PathLike) -> None:
    """Refuses a key file inside the output directory, where it would travel with the shards."""
    if key_file is None:
        return
    key, out = _absolute(key_file), _absolute(out_dir)
    if key == out or key.startswith(out + "/"):
        raise ValueError(f"id key file {key} is inside the output directory {out}; keep it outside")


def _absolute(location: str | os.PathLike) -> str:
    """A location comparable by prefix: a resolved local path, or a bucket URL without a trailing /."""
    return os.fspath(location).rstrip("/") if storage.is_remote(location) else os.path.realpath(location)


def image_id(key: bytes, source: str) -> str:
    """The id of one image: HMAC-SHA256(key, source) truncated to 128 bits, hex."""
    return hmac.new(key, source.encode("utf-8"), hashlib.sha256).hexdigest()[:ID_HEX_CHARS]
