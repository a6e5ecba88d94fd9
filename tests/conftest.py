"""Shared test setup: 8 simulated CPU devices and a persistent compilation cache.

The device count must be fixed before jax is imported anywhere, so it is set here, at collection
time. Tests that want one device build a mesh of `jax.devices()[:1]`.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def realdata_root() -> pathlib.Path | None:
    """Where the shared real medical images are, or None (tests that need them then skip)."""
    env = os.environ.get("MERMED_REALDATA")
    root = pathlib.Path(env) if env else _REPO.parent / "shared" / "realdata"
    return root if root.is_dir() else None


@pytest.fixture
def realdata() -> pathlib.Path:
    root = realdata_root()
    if root is None:
        pytest.skip("real data not found: set MERMED_REALDATA or place ../shared/realdata")
    return root
