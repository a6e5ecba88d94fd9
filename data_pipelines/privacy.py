"""Image ids that identify nobody: a keyed HMAC of the source path or UID.

A plain hash of a path or DICOM UID can be reversed by anyone who can guess or enumerate the
inputs (UIDs and NIH-style file names are highly structured); a keyed HMAC cannot without the key.
The key lives outside the shards: in a file (`--id-key-file`) or the MERMED_ID_KEY environment
variable (hex). The same key gives the same ids, so a converted set can be joined back to its
sources by whoever holds the key, and by nobody else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets

KEY_ENV = "MERMED_ID_KEY"
KEY_BYTES = 32
ID_HEX_CHARS = 32  # 128 bits: no collisions in practice, short enough to print


def new_key_file(path: str | os.PathLike) -> pathlib.Path:
    """Creates a fresh random key file (hex, mode 0600); refuses to overwrite an existing one."""
    path = pathlib.Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    return path


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
        return _parse(pathlib.Path(key_file).read_text(), str(key_file))
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
    key = pathlib.Path(key_file).resolve()
    out = pathlib.Path(out_dir).resolve()
    if key == out or out in key.parents:
        raise ValueError(f"id key file {key} is inside the output directory {out}; keep it outside")


def image_id(key: bytes, source: str) -> str:
    """The id of one image: HMAC-SHA256(key, source) truncated to 128 bits, hex."""
    return hmac.new(key, source.encode("utf-8"), hashlib.sha256).hexdigest()[:ID_HEX_CHARS]
