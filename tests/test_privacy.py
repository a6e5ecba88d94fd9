"""Keyed image ids and key handling (data_pipelines/privacy.py)."""

import hashlib
import hmac
import os
import stat

import pytest

from data_pipelines import privacy


def test_image_id_is_truncated_hmac_sha256():
    key = bytes(range(32))
    expected = hmac.new(key, b"CT.1.2.840.113619", hashlib.sha256).hexdigest()[:32]
    assert privacy.image_id(key, "CT.1.2.840.113619") == expected
    assert privacy.image_id(b"x" * 32, "CT.1.2.840.113619") != expected  # another key, another id


def test_new_key_file_load_and_env(tmp_path, monkeypatch):
    path = privacy.new_key_file(tmp_path / "id.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = privacy.load_key(path)
    assert len(key) == privacy.KEY_BYTES
    with pytest.raises(FileExistsError):
        privacy.new_key_file(path)
    monkeypatch.setenv(privacy.KEY_ENV, key.hex())
    assert privacy.load_key() == key


def test_missing_or_bad_key_explains(tmp_path, monkeypatch):
    monkeypatch.delenv(privacy.KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="new-key"):
        privacy.load_key()
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    with pytest.raises(ValueError, match="hex"):
        privacy.load_key(bad)
    bad.write_text("abcd")
    with pytest.raises(ValueError, match="at least 16"):
        privacy.load_key(bad)


def test_key_inside_output_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="inside the output"):
        privacy.check_key_outside(out / "sub" / "id.key", out)
    privacy.check_key_outside(tmp_path / "id.key", out)
