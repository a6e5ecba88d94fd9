"""The pretraining job end to end: exact resume after kill -9, SIGTERM, a kill during an async save,
restoring onto another device count, and non-finite updates. Runs the real CLI in subprocesses."""

import ast
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from _checkpoint_job import saving_now, wait_for
from job_outputs import losses_by_step
from repo import ROOT

from data_pipelines.modalities import MODALITIES
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import pretrain, sharding
from mermed_jax.interop.weight_export import export_params
from mermed_jax.models import networks
from mermed_jax.models.precision import PRECISIONS
from mermed_jax.ssl import schedules as schedules_lib
from mermed_jax.training import checkpointing, metric_writers, train_state

N = 4  # steps before the interruption; runs go to 2N
JOB_TIMEOUT_S = 240.0  # the real CLI compiles for about half a minute before its first step
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_data(out, images_per_modality=24, size=40, seed=0, shard_size=8)
    return tuple(str(out / f"demo_{m}") for m in MODALITIES)


def _overrides(data_dirs, **extra) -> dict:
    values = {
        "data.dirs": repr(tuple(data_dirs)), "max_steps": 2 * N, "log_every_steps": 1,
        "checkpoint.every_steps": N, "crops.num_local": 2, "model.depth": 1, "log_flush_seconds": 0,
    }
    values.update(extra)
    return values


def _command(workdir, overrides) -> list[str]:
    return [sys.executable, "-m", "mermed_jax.pretrain", "--config=configs/demo_cpu.py", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _env(devices: int = 2) -> dict:
    """Each run compiles its own program. With the persistent compilation cache shared between
    the runs, the bitwise comparison failed once (differences of 1e-9) on a heavily loaded machine
    and passed on rerun; without it, it has always passed. Cause not established."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT),
               JAX_PLATFORMS="cpu")
    for name in ("PYTEST_CURRENT_TEST", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(name, None)
    return env


def _run(workdir, overrides, devices=2) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(workdir, overrides), cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _start(workdir, overrides, devices=2) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir, overrides), cwd=ROOT, env=_env(devices), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _complete_steps(workdir) -> list[int]:
    return checkpointing.complete_steps(pathlib.Path(workdir) / "checkpoints")


def _assert_states_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_kill9_then_resume_is_bitwise_identical(tmp_path, data_dirs, precision):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(straight, _overrides(data_dirs, precision=precision))
    proc = _start(killed, _overrides(data_dirs, precision=precision, **{"data.worker_count": 1}))
    wait_for(lambda: N in _complete_steps(killed), proc, timeout=JOB_TIMEOUT_S)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: Grain's worker process too
    assert proc.wait() == -signal.SIGKILL
    assert 2 * N not in _complete_steps(killed)
    _run(killed, _overrides(data_dirs, precision=precision, **{"data.worker_count": 1}))

    state_a, _, step_a = checkpointing.load_train_state(straight)
    state_b, _, step_b = checkpointing.load_train_state(killed)
    assert step_a == step_b == 2 * N
    _assert_states_equal(state_a, state_b)
    losses_a, losses_b = losses_by_step(straight), losses_by_step(killed)
    assert sorted(losses_a) == list(range(1, 2 * N + 1))
    assert losses_a == losses_b


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, data_dirs):
    overrides = _overrides(data_dirs, max_steps=1000, **{"checkpoint.every_steps": 1000})
    proc = _start(tmp_path, overrides)
    wait_for(lambda: len(losses_by_step(tmp_path)) >= 3, proc, timeout=JOB_TIMEOUT_S)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    saved = _complete_steps(tmp_path)
    assert len(saved) == 1 and 3 <= saved[0] < 1000
    stopped_at = saved[0]
    _run(tmp_path, _overrides(data_dirs, max_steps=stopped_at + 2, **{"checkpoint.every_steps": 1000}))
    _, _, step = checkpointing.load_train_state(tmp_path)
    assert step == stopped_at + 2
    assert sorted(losses_by_step(tmp_path))[-1] == stopped_at + 2


def test_kill_during_async_save_keeps_previous_checkpoint(tmp_path, data_dirs):
    overrides = _overrides(data_dirs, max_steps=60, **{"checkpoint.every_steps": 1, "checkpoint.keep": 100})
    proc = _start(tmp_path, overrides)
    wait_for(lambda: saving_now(tmp_path) and len(_complete_steps(tmp_path)) >= 2, proc, timeout=JOB_TIMEOUT_S, poll=0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = _complete_steps(tmp_path)
    state, _, step = checkpointing.load_train_state(tmp_path)
    assert step == complete[-1] and int(state.step) == step
    _run(tmp_path, _overrides(data_dirs, max_steps=step + 1, **{"checkpoint.every_steps": 1, "checkpoint.keep": 100}))
    assert checkpointing.load_train_state(tmp_path)[2] == step + 1


def test_checkpoint_from_8_devices_restores_onto_4(tmp_path, data_dirs):
    _run(tmp_path, _overrides(data_dirs, max_steps=N, **{"mesh.shape": "(2,4,1)"}), devices=8)
    saved, config, step = checkpointing.load_train_state(tmp_path)
    mesh = sharding.make_mesh((2, 2, 1), jax.devices()[:4])
    boxed = jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh)
    target = checkpointing.abstract_with_shardings(checkpointing.nn.unbox(boxed), shardings)
    manager = checkpointing.make_manager(tmp_path, config.checkpoint)
    restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
        state=checkpointing.ocp.args.StandardRestore(target)))["state"]
    assert restored.memory.queue.sharding.mesh.devices.size == 4
    assert len(restored.memory.queue.addressable_shards) == 4
    _assert_states_equal(saved, restored)


def test_non_finite_updates_are_skipped_then_stop_the_job(tmp_path, data_dirs, monkeypatch, tiny_config):
    config = tiny_config()
    for key, value in _overrides(data_dirs, max_steps=12, max_skipped_steps=3).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ast.literal_eval(value) if isinstance(value, str) else value
    real = schedules_lib.build_schedules

    def poisoned(cfg, steps_per_epoch=None):
        s = real(cfg, steps_per_epoch)
        temp = s.teacher_temp.copy()
        temp[2] = np.nan  # one transient bad step (the 3rd)
        temp[6:] = np.nan  # then persistently from the 7th step
        return schedules_lib.Schedules(s.learning_rate, s.weight_decay, s.momentum, temp)

    monkeypatch.setattr(pretrain, "build_schedules", poisoned)
    with pytest.raises(pretrain.NonFiniteTrainingError, match=r"last 3 updates.*max_skipped_steps=3.*checkpoint is step 4"):
        pretrain.train(config, tmp_path)
    losses = losses_by_step(tmp_path)
    assert np.isnan(losses[3]) and np.isfinite(losses[4])
    assert _complete_steps(tmp_path) == [4]
    state, _, _ = checkpointing.load_train_state(tmp_path)
    assert int(state.skipped_steps) == 1 and int(state.nonfinite_streak) == 0 and int(state.step) == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_init_checkpoint_loads_into_student_and_teacher(tmp_path, data_dirs, tiny_config):
    """config.init_checkpoint (timm-named safetensors here) replaces the random initialisation."""
    config = tiny_config()
    donor = train_state.init_train_state(config, jax.random.key(123))
    weights = tmp_path / "donor.safetensors"
    export_params(checkpointing.nn.unbox(donor.params)["backbone"], None,
                  networks.backbone_config(config, teacher=True), weights, "safetensors")
    for key, value in _overrides(data_dirs, max_steps=1).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ast.literal_eval(value) if isinstance(value, str) else value
    config.model.depth = 2
    config.init_checkpoint = str(weights)
    pretrain.train(config, tmp_path / "run")
    state, _, _ = checkpointing.load_train_state(tmp_path / "run")
    expected = jax.tree.leaves(checkpointing.nn.unbox(donor.params)["backbone"])
    for name, tree in (("student", state.params), ("teacher", state.teacher_params)):
        got = jax.tree.leaves(tree["backbone"])
        distance = sum(float(np.linalg.norm(np.asarray(a) - np.asarray(b))) for a, b in zip(got, expected))
        scale = sum(float(np.linalg.norm(np.asarray(b))) for b in expected)
        assert distance < 0.02 * scale, name  # one small step (and one EMA step) away from the donor
    # the logged step carries the per-modality memory loss of every modality in the balanced batch
    logged = metric_writers.read_metrics(tmp_path / "run")[-1]
    for name in MODALITIES:
        assert np.isfinite(logged[f"memory_loss/{name}"]) and f"memory_fill/{name}" in logged, name
    assert 0.0 <= logged["data/wait_fraction"] <= 1.0


def test_a_failing_metrics_close_does_not_replace_the_loop_error(tmp_path, data_dirs, monkeypatch, tiny_config, caplog):
    """The loop's own error propagates; the metrics close that then fails too is logged."""
    config = tiny_config()
    for key, value in _overrides(data_dirs, max_steps=1).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = ast.literal_eval(value) if isinstance(value, str) else value
    real_make_writer = metric_writers.make_writer

    def failing_close(*args, **kwargs):
        writer = real_make_writer(*args, **kwargs)

        def close():
            raise pretrain.storage.StorageError("gs://b/run/metrics/000000000001.jsonl: writing failed: outage")
        writer.close = close
        return writer

    def failing_save(*args, **kwargs):
        raise checkpointing.CheckpointSaveError("the save failed")

    monkeypatch.setattr(metric_writers, "make_writer", failing_close)
    monkeypatch.setattr(checkpointing, "save", failing_save)
    with caplog.at_level("ERROR"), pytest.raises(checkpointing.CheckpointSaveError, match="the save failed"):
        pretrain.train(config, tmp_path / "run")
    assert any("metrics not all written" in r.getMessage() and "000000000001.jsonl" in r.getMessage()
               for r in caplog.records)
