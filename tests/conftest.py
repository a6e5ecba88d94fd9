"""Shared test setup: 8 simulated CPU devices, a persistent compilation cache, shared fixtures.

The device count must be fixed before jax is imported anywhere, so it is set here, at collection
time. Tests that want one device build a mesh of `jax.devices()[:1]`.
"""
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from object_stores import ObjectStores  # noqa: E402

# Bucket endpoints for this session, exported before any storage library reads its environment;
# the servers start when a test first asks for a bucket (see object_stores.py).
_STORES = ObjectStores(pathlib.Path(tempfile.mkdtemp(prefix="mermed-object-stores-")))
os.environ.update(_STORES.client_env())

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402
from fuzzing import FUZZ_EXAMPLES_ENV  # noqa: E402
from hypothesis import settings  # noqa: E402
from repo import ROOT, tiny_config_dict  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Property and fuzz tests: a fixed seed and no example database in CI, so `make test` tries the same
# inputs on every run; `make fuzz` (MERMED_FUZZ_EXAMPLES set) draws new ones each run, printing the
# seed and a reproduction blob for any failure (rerun with --hypothesis-seed=N).
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("long", deadline=None, database=None, print_blob=True)
settings.load_profile("long" if os.environ.get(FUZZ_EXAMPLES_ENV) else "ci")


def realdata_root() -> pathlib.Path | None:
    """Where the shared real medical images are, or None (tests that need them then skip)."""
    env = os.environ.get("MERMED_REALDATA")
    root = pathlib.Path(env) if env else ROOT.parent / "shared" / "realdata"
    return root if root.is_dir() else None


@pytest.fixture
def realdata() -> pathlib.Path:
    root = realdata_root()
    if root is None:
        pytest.skip("real data not found: set MERMED_REALDATA or place ../shared/realdata")
    return root


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ml_collections.ConfigDict]:
    """A factory: tiny_config("model.depth=1,batch=16") is a fresh ConfigDict of configs/demo_cpu.py
    with those `key=value` arguments applied (dotted keys and the aliases get_config accepts);
    tiny_config() is the demo config unchanged. Each call builds a new one, free to mutate."""
    return tiny_config_dict


@pytest.fixture(scope="session")
def object_stores() -> Iterator[ObjectStores]:
    """The local GCS emulator (behind the fault proxy) and S3 server, started once per session."""
    _STORES.start()
    yield _STORES
    _STORES.stop()


@pytest.fixture
def gcs_bucket(object_stores: ObjectStores) -> Iterator[str]:
    """A fresh gs:// bucket; the fault proxy is idle before and after the test."""
    object_stores.proxy.clear()
    yield object_stores.new_bucket("gs")
    object_stores.proxy.clear()


@pytest.fixture
def s3_bucket(object_stores: ObjectStores) -> str:
    return object_stores.new_bucket("s3")
