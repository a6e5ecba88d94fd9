"""A pod job with every location in a bucket, rehearsed against the local GCS emulator.

Convert the demo sets (and a small real set, when ../shared/realdata is here) into the bucket with
the id key in the bucket too; pretrain 2 processes x 4 CPU devices with data and workdir in the
bucket; kill -9 the job's process group mid-run and resume it, bitwise equal to an uninterrupted
run; a storm of HTTP 503s and dropped connections is ridden out; SIGTERM makes the job save
and exit 0; evaluate and export from the bucket into the bucket.
Every job runs in an empty working directory with HOME and TMPDIR beside it, and nothing of the
run may appear there (no silent local fallback such as a folder named "gs:"). The jobs'
compilation cache is the only local state they share with the tests; libraries' caches and settings in
HOME (~/.cache, ~/.config/matplotlib, ~/.keras) are the only files they may leave.
"""

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from repo import ROOT

from data_pipelines import storage
from data_pipelines.modalities import MODALITIES
from mermed_jax.training import checkpointing, metric_writers

PYTHON = os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
pytestmark = [pytest.mark.multiprocess, pytest.mark.long, pytest.mark.timeout(2400)]


@pytest.fixture
def job_env(tmp_path: pathlib.Path) -> Iterator[dict]:
    """Environment of every job: the emulator endpoints (inherited from conftest), an empty
    working directory, HOME and TMPDIR that the test checks afterwards."""
    scratch = {name: tmp_path / name for name in ("cwd", "home", "tmp", "logs")}
    for folder in scratch.values():
        folder.mkdir()
    env = dict(os.environ, PYTHON=PYTHON, HOME=str(scratch["home"]), TMPDIR=str(scratch["tmp"]),
               MERMED_LOG_DIR=str(scratch["logs"]), JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))
    for key in ("XLA_FLAGS", "PYTEST_CURRENT_TEST", "PYTHONPATH"):
        env.pop(key, None)
    started: list[subprocess.Popen] = []
    yield {"env": env, "started": started, **scratch}
    for job in started:  # a failed assertion must not leave a 2-process job running
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _run(job_env: dict, argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=job_env["cwd"], env=job_env["env"], capture_output=True, text=True, timeout=timeout)
    logs = "".join(p.read_text()[-2000:] for p in sorted(job_env["logs"].glob("*.log")))
    assert done.returncode == 0, f"{argv[:4]}: {done.stderr[-4000:]}{logs}"
    return done


def _pretrain_argv(workdir: str, dirs: list[str], max_steps: int) -> list[str]:
    overrides = {
        "data.dirs": repr(tuple(dirs)), "max_steps": max_steps, "log_every_steps": 1, "log_flush_seconds": 0,
        "checkpoint.every_steps": 5, "crops.num_local": 2, "model.depth": 1,
        "mesh.shape": "(1,4,1)", "mesh.dcn_shape": "(2,1,1)", "mesh.granule": "process",
    }
    return ["bash", str(LAUNCH), "-n", "2", "-d", "4", "--", f"--config={ROOT}/configs/demo_cpu.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _start(job_env: dict, argv: list[str]) -> subprocess.Popen:
    job = subprocess.Popen(argv, cwd=job_env["cwd"], env=job_env["env"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    job_env["started"].append(job)
    return job


def _wait_for_checkpoint(workdir: str, step: int, job: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while step not in checkpointing.complete_steps(storage.join(workdir, "checkpoints")):
        assert job.poll() is None, f"job ended ({job.returncode}) before checkpoint {step}: {job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint {step} in {timeout} s"
        time.sleep(0.5)


def _convert(job_env: dict, bucket: str, realdata: pathlib.Path | None) -> list[str]:
    data, key = f"{bucket}/data", f"{bucket}/secrets/id.key"
    convert = [PYTHON, "-m", "data_pipelines.convert"]
    _run(job_env, [*convert, "demo", "--out", data, "--images-per-modality", "24", "--size", "40", "--shard-size", "8"])
    dirs = [f"{data}/demo_{m}" for m in MODALITIES]
    if realdata is not None:
        _run(job_env, [*convert, "new-key", key])
        _run(job_env, [*convert, "medmnist", str(realdata / "medmnist" / "breastmnist.npz"), "--out", data,
                       "--id-key-file", key, "--shard-size", "200", "--workers", "2", "--no-progress"])
        dirs.append(f"{data}/breastmnist")
    return dirs


def _leaves(workdir: str) -> list[np.ndarray]:
    state, _, _ = checkpointing.load_train_state(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_pod_job_in_a_bucket(gcs_bucket, object_stores, job_env, request):
    from conftest import realdata_root  # noqa: PLC0415 - the optional real set

    started = time.monotonic()
    dirs = _convert(job_env, gcs_bucket, realdata_root())

    # An uninterrupted run, and one killed with kill -9 after its first checkpoint, then resumed.
    straight, resumed = f"{gcs_bucket}/runs/straight", f"{gcs_bucket}/runs/resumed"
    _run(job_env, _pretrain_argv(straight, dirs, 10))
    job = _start(job_env, _pretrain_argv(resumed, dirs, 10))
    _wait_for_checkpoint(resumed, 5, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    _run(job_env, _pretrain_argv(resumed, dirs, 10))
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = {w: {r["step"]: r["loss"] for r in metric_writers.read_metrics(w) if "loss" in r} for w in (straight, resumed)}
    assert losses[straight] == losses[resumed] and sorted(losses[straight]) == list(range(1, 11))

    # A storm of 503s and dropped connections on the shard reads, which the job rides out; then
    # SIGTERM (a preemption): every host saves at the same step and the job exits 0. The storm
    # spares the checkpoint objects: when gcsfs's six attempts at one of Orbax's metadata writes
    # all met a 503, the save's background thread failed and both processes waited forever for
    # its signal on the coordination service (orbax-checkpoint 0.12.8; see docs/pods.md).
    preempted = f"{gcs_bucket}/runs/preempted"
    job = _start(job_env, _pretrain_argv(preempted, dirs, 400))
    _wait_for_checkpoint(preempted, 5, job)
    object_stores.proxy.only_objects = "data%2F"
    object_stores.proxy.fail_next, object_stores.proxy.reset_next = 40, 8
    deadline = time.monotonic() + 600
    while object_stores.proxy.fail_next or object_stores.proxy.reset_next:  # the job meets every fault
        assert job.poll() is None, f"the job died in the storm: {job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "the job made no requests for 10 minutes"
        time.sleep(0.5)
    _wait_for_checkpoint(preempted, 10, job)
    os.killpg(job.pid, signal.SIGTERM)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-3000:]
    assert '"preempted": 1.0' in output
    assert max(checkpointing.complete_steps(f"{preempted}/checkpoints")) > 5

    # Evaluation and export read the bucket and write into it.
    eval_dir = f"{gcs_bucket}/eval/demo"
    _run(job_env, [PYTHON, "-m", "mermed_jax.evaluate", f"--config={ROOT}/configs/eval_demo.py:root={gcs_bucket}/data",
                   f"--workdir={straight}", f"--eval_dir={eval_dir}", "--config.bootstrap.resamples=20"], timeout=1200)
    for name in ("results.csv", "results.md"):
        assert storage.exists(f"{eval_dir}/{name}"), name
    export = f"{gcs_bucket}/export/teacher.safetensors"
    _run(job_env, [PYTHON, "-m", "mermed_jax.export", f"--workdir={straight}", "--format=safetensors", f"--out={export}"])
    assert storage.size(export) > 0

    # Libraries' own caches and settings in HOME are allowed: ~/.cache, matplotlib's config folder
    # and the ~/.keras/keras.json that importing tensorflow writes.
    allowed = {".cache", ".config", ".keras"}
    left = [p for name in ("cwd", "home", "tmp") for p in job_env[name].rglob("*")
            if not (name == "home" and p.relative_to(job_env["home"]).parts[0] in allowed)]
    assert not left, f"the run wrote to the local disk: {left[:10]}"
    request.node.user_properties.append(("rehearsal_seconds", round(time.monotonic() - started)))
    print(f"rehearsal took {time.monotonic() - started:.0f} s")
