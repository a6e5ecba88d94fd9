"""Fault injection: kill -9 at random points of checkpoint saving, a full disk during a save, damaged
checkpoints, an unwritable workdir, a shard deleted mid-run, a Grain worker process dying.

Each must end with every committed checkpoint intact, a clear message, and a clean resume. The
checkpoint faults use the stand-in job of tests/_checkpoint_job.py (the job's own manager and save
and restore functions, started in two seconds) so that many kill points fit the CI budget; kill -9
and SIGTERM of the real pretraining CLI are in tests/test_pretrain.py.
"""

from __future__ import annotations

import os
import pathlib
import random
import resource
import shutil
import signal

import grain
import jax
import ml_collections
import numpy as np
import psutil
import pytest
from _checkpoint_job import META, saving_now, start, state_at, wait_for

from data_pipelines import convert as convert_cli
from data_pipelines import pipeline
from data_pipelines.multicrop import MultiCropConfig
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import pretrain
from mermed_jax.interop.trees import backbone_shapes, unflatten
from mermed_jax.interop.weight_export import export_params
from mermed_jax.models.vit import ViTConfig
from mermed_jax.training import checkpointing

KILLS = int(os.environ.get("MERMED_FAULT_KILLS", 4))  # kill points per run; `make fuzz` sets 40


def _finish(workdir: pathlib.Path, last_step: int) -> str:
    """Runs the stand-in job to `last_step`; returns its stdout (it checks what it restores)."""
    proc = start(workdir, last_step)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return out


def _kill_group(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --------------------------------------------------------------------------- checkpoint saving

@pytest.mark.fuzz
def test_kill9_at_random_points_of_saving_loses_no_committed_checkpoint(tmp_path):
    rng = random.Random(os.environ.get("MERMED_FAULT_SEED", "8"))
    during_save = 0
    latest = 0
    for kill in range(KILLS):
        proc = start(tmp_path)
        wait_for(lambda: max(checkpointing.complete_steps(tmp_path / "checkpoints"), default=0) > latest, proc)
        if kill % 2:  # inside a save: its temporary directory exists, then a random moment of it
            wait_for(lambda: saving_now(tmp_path), proc, poll=0.0005)
            wait_for(lambda: rng.random() < 0.3, proc, poll=0.0005)
        else:  # any moment a few saves later
            wait_for(lambda: rng.random() < 0.02, proc, poll=0.002)
        during_save += saving_now(tmp_path)
        _kill_group(proc)
        complete = checkpointing.complete_steps(tmp_path / "checkpoints")
        assert complete and complete[-1] > latest  # progress is kept: nothing committed was lost
        latest = complete[-1]
    out = _finish(tmp_path, latest + 2)  # resumes, checking state and iterator position exactly
    assert out.splitlines()[0] == f"resumed {latest}" and out.splitlines()[-1] == f"saved {latest + 2}"
    assert during_save >= 1, "no kill landed during a save; the test did not test what it says"


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG


def test_full_disk_during_a_save_is_a_clear_error_and_the_job_resumes(tmp_path):
    proc = start(tmp_path, preexec_fn=_ignore_sigxfsz)
    wait_for(lambda: len(checkpointing.complete_steps(tmp_path / "checkpoints")) >= 2, proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))  # the disk fills up
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    complete = checkpointing.complete_steps(tmp_path / "checkpoints")
    assert "CheckpointSaveError" in err and "File too large" in err, err[-3000:]
    assert f"The last complete checkpoint is step {complete[-1]}, untouched" in err
    assert f"saving the checkpoint of step {complete[-1] + 1} failed" in err
    out = _finish(tmp_path, complete[-1] + 1)
    assert out.splitlines() == [f"resumed {complete[-1]}", f"saved {complete[-1] + 1}"]


@pytest.fixture(scope="module")
def saved_job(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("saved_job")
    _finish(workdir, 3)
    return workdir


def _restore(workdir: pathlib.Path, step: int):
    manager = checkpointing.make_manager(workdir, ml_collections.ConfigDict(dict(keep=3, keep_period=None, async_save=False)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state_at(step))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    try:
        return checkpointing.restore(manager, step, abstract, data, META)
    finally:
        manager.close()


@pytest.mark.parametrize("damage", ["flip_one_bit", "truncate", "delete_data", "delete_metadata"])
def test_damaged_checkpoint_restores_exactly_or_is_refused_naming_it(saved_job, tmp_path, damage):
    """Orbax rebuilds a plain dict's structure without _METADATA (the digest then vouches for the
    values); the other damage is refused, and the checkpoint before it still restores."""
    workdir = tmp_path / "job"
    shutil.copytree(saved_job, workdir)
    step_dir = workdir / "checkpoints" / "3"
    data_files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest = data_files[-1]
    raw = bytearray(biggest.read_bytes())
    if damage == "flip_one_bit":
        raw[len(raw) // 2] ^= 0x04  # OCDBT data files carry no checksum: this restored silently
        biggest.write_bytes(bytes(raw))
    elif damage == "truncate":
        biggest.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "delete_data":
        biggest.unlink()
    else:
        (step_dir / "state" / "_METADATA").unlink()
    if damage == "delete_metadata":
        np.testing.assert_array_equal(np.asarray(_restore(workdir, 3).state["params"]), state_at(3)["params"])
        return
    with pytest.raises(checkpointing.CheckpointCorruptError, match=r"checkpoints/3: .*(differ from those saved|cannot be restored)"):
        _restore(workdir, 3)
    restored = _restore(workdir, 2)  # the operator moves step 3 away; the one before is intact
    np.testing.assert_array_equal(np.asarray(restored.state["params"]), state_at(2)["params"])


# --------------------------------------------------------------------------- unwritable places

def test_unwritable_workdir_and_outputs_fail_naming_the_path_before_any_work(tmp_path, capsys, monkeypatch, tiny_config):
    """Root ignores file modes, so the unwritable place is a path under a regular file."""
    monkeypatch.setenv("MERMED_ID_KEY", "ab" * 32)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = tiny_config()
    with pytest.raises(OSError, match=str(blocker)):
        pretrain.train(config, blocker / "workdir")
    source = tmp_path / "images" / "cls"
    source.mkdir(parents=True)
    (source / "x.png").write_bytes(b"")
    code = convert_cli.main(["folder", str(tmp_path / "images"), "--modality", "cxr", "--out", str(blocker / "out"),
                             "--dataset", "d", "--no-progress", "--workers", "1"])
    assert code == 1 and f"Not a directory: '{blocker / 'out'}" in capsys.readouterr().err
    config_vit = ViTConfig(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4, img_size=8, precision="float32")
    params = unflatten({p: np.zeros(s, np.float32) for p, s in backbone_shapes(config_vit).items()})
    with pytest.raises(OSError, match=str(blocker)):
        export_params(params, None, config_vit, blocker / "model.safetensors", "safetensors")
    assert blocker.read_text() == ""


# --------------------------------------------------------------------------- data faults

CROPS = MultiCropConfig(global_size=16, local_size=8, num_local=1)


@pytest.fixture(scope="module")
def three_modalities(tmp_path_factory) -> tuple[str, ...]:
    out = tmp_path_factory.mktemp("faults_data")
    write_demo_data(out, images_per_modality=24, size=24, seed=0, shard_size=8)
    return tuple(str(out / f"demo_{m}") for m in ("ct", "cxr", "us"))


def _config(dirs, **kw) -> pipeline.TrainConfig:
    return pipeline.TrainConfig(dirs=dirs, per_device_batch=1, crops=CROPS, cycle_length=2, shuffle_window=8, **kw)


def _batches(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_shard_deleted_mid_run_names_the_file_and_the_run_resumes_exactly(three_modalities, tmp_path):
    dirs = tuple(shutil.copytree(d, tmp_path / pathlib.Path(d).name) for d in three_modalities)
    dirs = tuple(map(str, dirs))
    reference = _batches(pipeline.train_iterator(_config(dirs)), 12)
    live = pipeline.train_iterator(_config(dirs))
    _assert_same(_batches(live, 2), reference[:2])
    saved = live.get_state()
    shards = sorted(pathlib.Path(dirs[0]).glob("train-*.tfrecord"))
    backup = tmp_path / "backup"
    backup.mkdir()
    for shard in shards:
        shutil.move(shard, backup / shard.name)
    try:  # a file already open reads on (its data is intact); one not yet open is named
        _assert_same(_batches(live, 10), reference[2:])
    except FileNotFoundError as e:
        assert any(str(s) in str(e) for s in shards), e
    live.close()
    with pytest.raises(FileNotFoundError, match=str(shards[0])):  # a restart finds it missing at once
        pipeline.train_iterator(_config(dirs))
    for shard in shards:
        shutil.move(backup / shard.name, shard)
    resumed = pipeline.train_iterator(_config(dirs))
    resumed.set_state(saved)
    _assert_same(_batches(resumed, 10), reference[2:])


def test_grain_worker_killed_is_a_clear_error_and_the_run_resumes_exactly(three_modalities):
    reference = _batches(pipeline.train_iterator(_config(three_modalities)), 6)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    live = pipeline.train_iterator(_config(three_modalities, worker_count=1))
    _assert_same(_batches(live, 2), reference[:2])
    saved = live.get_state()
    workers = [p for p in psutil.Process().children(recursive=True)
               if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="Worker process was terminated unexpectedly with exit code -9"):
        _batches(live, 20)
    live.close()
    resumed = pipeline.train_iterator(_config(three_modalities))
    resumed.set_state(saved)
    _assert_same(_batches(resumed, 4), reference[2:])
