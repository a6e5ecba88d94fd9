"""Export straight from a pretraining workdir: the teacher alone is read (a partial Orbax restore),
checked against the digest saved with it, and exported with the run's architecture and pixel
statistics, without the training data."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
import pytest
import tensorstore as ts
from repo import ROOT

from data_pipelines import stats
from data_pipelines.modalities import MODALITIES
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import export
from mermed_jax.eval import encoders
from mermed_jax.interop import files
from mermed_jax.training import checkpointing, run_record, train_state

STEPS = (3, 5)
DATASETS = ("demo_ct", "demo_cxr")


def write_tiny_run(workdir: pathlib.Path, data_dirs: tuple[str, ...], config: ml_collections.ConfigDict) -> None:
    """A pretraining workdir as pretrain.py leaves it (config.json, run.json, checkpoints written by
    the job's manager with their digests) at STEPS, without the minutes of training: the teacher of
    step s is the student's init x (1 - s / 100) (smaller weights: a forward as well-conditioned as
    the init's), so reading the student or another step instead shows."""
    config.data.dirs = data_dirs
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    run_record.settle(workdir, config, resuming=False)
    state = nn.unbox(train_state.init_train_state(config, jax.random.key(0)))
    manager = checkpointing.make_manager(workdir, ml_collections.ConfigDict({"keep": 3, "keep_period": None, "async_save": False}))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step in STEPS:
        scale = 1 - step / 100
        shifted = state.replace(teacher_params=jax.tree.map(lambda x, s=scale: x * s, state.params),
                                teacher_batch_stats=jax.tree.map(lambda x, s=scale: x * s, state.batch_stats))
        checkpointing.save(manager, step, shifted, data, {"seed": 0})
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_data(out, images_per_modality=16, size=16, seed=0, shard_size=8)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_root, tiny_config) -> pathlib.Path:
    """A tiny run whose training data is gone after it started (its run.json keeps the statistics)."""
    root = tmp_path_factory.mktemp("run")
    train_data = shutil.copytree(demo_root, root / "train_data")
    workdir = root / "workdir"
    write_tiny_run(workdir, tuple(str(train_data / d) for d in DATASETS), tiny_config("model.depth=1"))
    shutil.rmtree(train_data)
    return workdir


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _file_bytes_read() -> int:
    """Bytes TensorStore has read from files in this process so far (Orbax reads through it)."""
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
        return sum(v["value"] for v in metric["values"])
    return 0


def test_cli_exports_the_teacher_of_the_latest_step_without_the_training_data(tmp_path, workdir):
    out = tmp_path / "teacher.msgpack"
    cmd = [sys.executable, "-m", "mermed_jax.export", f"--workdir={workdir}", "--format=msgpack", f"--out={out}"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {STEPS[-1]}" in done.stdout

    state, _, step = checkpointing.load_train_state(workdir)
    assert step == STEPS[-1]
    exported = files.read_msgpack(out)
    assert set(exported) == {"backbone"}
    _assert_trees_equal(exported["backbone"], jax.device_get(state.teacher_params["backbone"]))
    mean, std = run_record.load(workdir).stats()
    normalization = json.loads(out.with_suffix(".json").read_text())["normalization"]
    np.testing.assert_allclose([normalization[m]["mean"] for m in MODALITIES], mean, rtol=1e-6)
    np.testing.assert_allclose([normalization[m]["std"] for m in MODALITIES], std, rtol=1e-6)


def test_export_with_head_at_a_given_step(tmp_path, workdir):
    out = tmp_path / "teacher.msgpack"
    _, step = export.export_workdir(workdir, out, "msgpack", step=STEPS[0], with_head=True)
    state, _, _ = checkpointing.load_train_state(workdir, STEPS[0])
    exported = files.read_msgpack(out)
    assert step == STEPS[0] and set(exported) == {"backbone", "head", "head_batch_stats"}
    _assert_trees_equal(exported["head"], jax.device_get(state.teacher_params["head"]))
    _assert_trees_equal(exported["head_batch_stats"], jax.device_get(state.teacher_batch_stats["head"]))


def test_teacher_load_reads_a_fraction_of_the_checkpoint(workdir):
    """Measured, not assumed: TensorStore's count of file bytes read, for a teacher-only load and a
    full one (the teacher first, so no cache of the full load's reads can serve it)."""
    before = _file_bytes_read()
    teacher, _, _ = checkpointing.load_teacher(workdir)
    teacher_read = _file_bytes_read() - before
    with_head, _, _ = checkpointing.load_teacher(workdir, with_head=True)
    before = _file_bytes_read()
    state, _, _ = checkpointing.load_train_state(workdir)
    full_read = _file_bytes_read() - before

    assert set(teacher) == {"teacher_params"} and set(teacher["teacher_params"]) == {"backbone"}
    assert set(with_head) == {"teacher_params", "teacher_batch_stats"}
    assert set(with_head["teacher_params"]) == {"backbone", "head"}
    _assert_trees_equal(teacher["teacher_params"], {"backbone": state.teacher_params["backbone"]})
    _assert_trees_equal(with_head["teacher_batch_stats"], state.teacher_batch_stats)
    # The teacher backbone is about 7% of this state's bytes (student, head, Adam moments, memory).
    assert 0 < teacher_read < full_read / 4, (teacher_read, full_read)


def _damage_digest(workdir: pathlib.Path, step: int, prefix: str) -> None:
    """Changes the saved digest of the first leaf under `prefix`, as a flipped bit in its array would."""
    path = workdir / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    key = next(k for k in meta[checkpointing.DIGEST_KEY] if k.startswith(prefix))
    meta[checkpointing.DIGEST_KEY][key][0] ^= 1
    path.write_text(json.dumps(meta))


def test_digest_is_checked_for_the_restored_leaves_only(tmp_path, workdir):
    damaged = shutil.copytree(workdir, tmp_path / "workdir")
    step = STEPS[-1]
    _damage_digest(damaged, step, ".opt_state")
    _damage_digest(damaged, step, ".memory")
    checkpointing.load_teacher(damaged, with_head=True)  # neither is read, so neither is checked
    with pytest.raises(checkpointing.CheckpointCorruptError, match=f"{damaged}/checkpoints/{step}: the restored arrays"):
        checkpointing.load_train_state(damaged)

    _damage_digest(damaged, step, ".teacher_params['head']")
    checkpointing.load_teacher(damaged)  # the backbone alone is intact
    with pytest.raises(checkpointing.CheckpointCorruptError, match=r"1 of \d+ leaves changed, first \[\".teacher_params\['head'\]"):
        checkpointing.load_teacher(damaged, with_head=True)
    _damage_digest(damaged, step, ".teacher_params['backbone']")
    with pytest.raises(checkpointing.CheckpointCorruptError, match=f"{damaged}/checkpoints/{step}"):
        checkpointing.load_teacher(damaged)


def test_bad_step_or_workdir_is_an_error_naming_the_path(tmp_path, workdir):
    with pytest.raises(FileNotFoundError, match=rf"{workdir}/checkpoints: no checkpoint at step 4 \(have steps \[3, 5\]\)"):
        checkpointing.load_teacher(workdir, 4)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}/nothing/config.json: not a pretraining workdir"):
        checkpointing.load_teacher(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty)
    with pytest.raises(FileNotFoundError, match=rf"{empty}/checkpoints: no complete checkpoint \(have steps \[\]\)"):
        checkpointing.load_teacher(empty)


def test_step_flag_parses_a_number_or_latest():
    assert export.parse_step("latest") is None and export.parse_step("40") == 40
    with pytest.raises(export.app.UsageError, match="--step=-1"):
        export.parse_step("-1")


def test_run_without_record_measures_its_data_dirs(tmp_path, workdir, demo_root):
    """A workdir from before run records: the statistics of its data.dirs, as its training measured them."""
    old = shutil.copytree(workdir, tmp_path / "old")
    (old / run_record.RUN_RECORD).unlink()
    out = tmp_path / "teacher.msgpack"
    with pytest.raises(FileNotFoundError, match=r"run\.json does not exist .* data\.dirs .* are not here"):
        export.export_workdir(old, out, "msgpack")
    assert not out.exists()

    config = json.loads((old / "config.json").read_text())
    config["data"]["dirs"] = [str(demo_root / d) for d in DATASETS]
    (old / "config.json").write_text(json.dumps(config))
    export.export_workdir(old, out, "msgpack")
    mean, _ = stats.measured_stats(config["data"]["dirs"], config["data"]["split"], fallback="imagenet")
    normalization = json.loads(out.with_suffix(".json").read_text())["normalization"]
    np.testing.assert_allclose([normalization[m]["mean"] for m in MODALITIES], mean, rtol=1e-6)


def test_cli_needs_exactly_one_source(tmp_path, workdir):
    cmd = [sys.executable, "-m", "mermed_jax.export", f"--workdir={workdir}", "--checkpoint=x.msgpack",
           f"--out={tmp_path / 'x.msgpack'}", "--format=msgpack"]
    done = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode != 0 and "exactly one of --workdir" in done.stderr


def test_evaluation_reads_the_teacher_alone(workdir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation restored the whole train state")

    monkeypatch.setattr(checkpointing, "load_train_state", refuse)
    encoder = encoders.from_checkpoint(workdir, STEPS[0])
    assert encoder.tag == f"step_{STEPS[0]:06d}"
    np.testing.assert_allclose(encoder.pixel_mean, run_record.load(workdir).stats()[0])


def test_digest_in_runs_of_leaves_equals_the_digest_in_one_program(monkeypatch, tiny_config):
    """state_digest bounds its memory by digesting runs of leaves: the values, and so every digest
    saved before, are unchanged."""
    state = nn.unbox(train_state.init_train_state(tiny_config("model.depth=1"), jax.random.key(0)))
    leaves = tuple(jax.tree.leaves(state))
    assert len(checkpointing._runs(leaves)) == 1
    whole = checkpointing.state_digest(state)
    monkeypatch.setattr(checkpointing, "_DIGEST_RUN_ELEMENTS", 100_000)
    assert len(checkpointing._runs(leaves)) > 3
    assert checkpointing.state_digest(state) == whole
