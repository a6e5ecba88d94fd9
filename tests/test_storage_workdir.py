"""A pretraining workdir in a bucket, end to end: pretraining on gs:// saves, resumes bitwise equal
to an uninterrupted run past a checkpoint cut off mid-save, writes metric parts and TensorBoard
events that read back, and uploads profiler traces; evaluation (--watch) and export read its
checkpoints and write to gs:// and s3://. Locations Orbax cannot use or the job may not use are
refused before anything compiles. Data stays local here (tests/test_bucket_rehearsal.py reads it
from buckets)."""

import os

import jax
import numpy as np
import pytest
from job_outputs import losses_by_step
from tensorboard.backend.event_processing import event_accumulator

from data_pipelines import storage
from data_pipelines.modalities import MODALITIES
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import evaluate, export, pretrain
from mermed_jax.eval import encoders, sweep
from mermed_jax.eval.eval_config import eval_recipe, validate
from mermed_jax.interop.exported_encoder import load_encoder
from mermed_jax.training import checkpointing, metric_writers, train_step

STEPS = 4  # checkpoints at 2 and 4
DATASETS = ("demo_ct", "demo_cxr")
S3_REFUSAL = r"cannot be on s3://: .*Orbax, which has no S3 support.*gs:// or a shared filesystem"


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> tuple[str, ...]:
    out = tmp_path_factory.mktemp("demo_data")
    write_demo_data(out, images_per_modality=24, size=40, seed=0, shard_size=8)
    return tuple(str(out / f"demo_{m}") for m in MODALITIES)


def _config(tiny_config, data_dirs, max_steps: int, **extra):
    config = tiny_config("model.depth=1,crops.num_local=2,log_every_steps=1,log_flush_seconds=0,"
                         "checkpoint.every_steps=2")
    config.data.dirs = data_dirs
    config.max_steps = max_steps
    for key, value in extra.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture(scope="module")
def gs_run(object_stores, tiny_config, data_dirs) -> str:
    """An uninterrupted run of STEPS steps in a bucket, tracing step 3 with the profiler."""
    workdir = object_stores.new_bucket("gs") + "/runs/straight"
    pretrain.train(_config(tiny_config, data_dirs, STEPS, **{"profile.every_steps": 3, "profile.num_steps": 1}), workdir)
    return workdir


def _states_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_in_a_bucket_past_a_cut_off_save_is_bitwise_identical(gs_run, object_stores, tiny_config, data_dirs):
    workdir = object_stores.new_bucket("gs") + "/runs/resumed"
    pretrain.train(_config(tiny_config, data_dirs, 3), workdir)  # saves 2, and 3 at the end
    # Step 3 cut off mid-save: its objects are there, its completion mark is not.
    storage.remove(f"{workdir}/checkpoints/3/commit_success.txt")
    assert checkpointing.complete_steps(f"{workdir}/checkpoints") == [2]
    pretrain.train(_config(tiny_config, data_dirs, STEPS), workdir)  # resumes from 2, logs 3 again

    state_a, _, step_a = checkpointing.load_train_state(gs_run)
    state_b, _, step_b = checkpointing.load_train_state(workdir)
    assert step_a == step_b == STEPS
    _states_equal(state_a, state_b)
    records = metric_writers.read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # the first run's step 3 superseded
    assert losses_by_step(workdir) == losses_by_step(gs_run)
    assert storage.listdir(f"{workdir}/metrics") == ["000000000001.jsonl", "000000000003.jsonl"]


def test_metric_parts_and_events_read_back(gs_run, tmp_path):
    losses = losses_by_step(gs_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    events = [n for n in storage.listdir(gs_run) if n.startswith("events.out.tfevents.")]
    assert events == ["events.out.tfevents.000000000001.mermed"]
    for name in events:  # TensorBoard's own reader, on a local copy
        (tmp_path / name).write_bytes(storage.read_bytes(f"{gs_run}/{name}"))
    accumulator = event_accumulator.EventAccumulator(str(tmp_path))
    accumulator.Reload()
    scalars = accumulator.Scalars("loss")
    assert [s.step for s in scalars] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([s.value for s in scalars], np.float32([losses[s] for s in range(1, STEPS + 1)]))
    assert f"memory_loss/{MODALITIES[0]}" in accumulator.Tags()["scalars"]


def test_profile_traces_and_no_credentials_in_the_workdir(gs_run):
    fs, inner = storage.filesystem(gs_run)
    traces = [p for p in fs.find(f"{inner}/plugins/profile") if p.endswith(".xplane.pb")]
    assert len(traces) == 1
    secrets = [os.environ[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "GOOGLE_AUTH_TOKEN_FOR_TESTING")]
    for name in ("config.json", "run.json"):
        text = storage.read_text(f"{gs_run}/{name}")
        assert not any(secret in text for secret in secrets), name


def test_a_half_written_step_is_not_complete(gcs_bucket, tmp_path):
    # In a bucket Orbax writes the final name first and marks completion last.
    storage.write_bytes(f"{gcs_bucket}/run/checkpoints/7/state/manifest.ocdbt", b"partial")
    assert checkpointing.complete_steps(f"{gcs_bucket}/run/checkpoints") == []
    assert encoders.checkpoint_steps(f"{gcs_bucket}/run") == []
    # Locally it writes a temporary name and renames it.
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    assert checkpointing.complete_steps(tmp_path / "checkpoints") == []


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if pretraining gets as far as building its train step."""
    def refuse(*args, **kwargs):
        raise AssertionError("the train step was built: the location was not refused early")
    monkeypatch.setattr(train_step, "jit_train_step", refuse)


def test_s3_workdir_is_refused_before_compiling(s3_bucket, tiny_config, data_dirs, no_compile, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match=S3_REFUSAL):
        pretrain.train(_config(tiny_config, data_dirs, 1), f"{s3_bucket}/run")
    assert not (tmp_path / "s3:").exists()  # never the silent local folder
    with pytest.raises(storage.StorageError, match=S3_REFUSAL):
        checkpointing.load_teacher(f"{s3_bucket}/run")


def test_missing_bucket_and_denied_workdir_are_refused_before_compiling(gcs_bucket, object_stores, tiny_config,
                                                                         data_dirs, no_compile):
    with pytest.raises(storage.StorageError, match=r"gs://no-such-bucket-q7.*does not exist"):
        pretrain.train(_config(tiny_config, data_dirs, 1), "gs://no-such-bucket-q7/run")
    object_stores.proxy.deny = True
    with pytest.raises(storage.StorageError, match=rf"{gcs_bucket}.*access denied"):
        pretrain.train(_config(tiny_config, data_dirs, 1), f"{gcs_bucket}/run")


def test_watch_and_export_from_a_bucket_workdir(gs_run, object_stores, data_dirs):
    config = eval_recipe()
    config.datasets.update({d: next(x for x in data_dirs if x.endswith(d)) for d in DATASETS})
    config.protocols = ("linear",)
    config.seeds = (0,)
    config.data.update(dict(image_size=32, crop_fraction=1.0, batch_size=16))
    config.linear.cs = (1.0,)
    config.bootstrap.resamples = 20
    config.watch.update(dict(idle_timeout_seconds=0.5, poll_seconds=0.1))
    validate(config)
    eval_dir = object_stores.new_bucket("gs") + "/eval"
    evaluate.watch(config, gs_run, eval_dir)  # every checkpoint of the run, then stops
    rows = sweep.read_results(f"{eval_dir}/results.csv")
    assert {r["encoder"] for r in rows} >= {"step_000002", "step_000004", "random", "pixels"}
    for name in ("summary.csv", "results.md", "auroc_bars.png", "roc_curves.png", "embedding_map.png"):
        assert storage.exists(f"{eval_dir}/{name}"), name
    assert storage.read_bytes(f"{eval_dir}/auroc_bars.png").startswith(b"\x89PNG")

    out = object_stores.new_bucket("gs") + "/export/teacher.safetensors"
    _, step = export.export_workdir(gs_run, out, "safetensors")
    assert step == STEPS
    exported = load_encoder(out)  # the weights and the config JSON beside them, from the bucket
    teacher, _, _ = checkpointing.load_teacher(gs_run)
    _states_equal(exported.params, jax.device_get(teacher["teacher_params"]["backbone"]))
    # and on to S3, from the msgpack of the bucket (export --checkpoint reads any location)
    msgpack = out.replace(".safetensors", ".msgpack")
    export.export_workdir(gs_run, msgpack, "msgpack")
    s3_out = object_stores.new_bucket("s3") + "/teacher.safetensors"
    export.export_checkpoint(msgpack, s3_out, "safetensors")
    _states_equal(load_encoder(s3_out).params, exported.params)


@pytest.fixture(params=["local", "gs"])
def location(request, tmp_path) -> str:
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("gcs_bucket") + "/run"


def test_metric_parts_roll_over_flush_whole_and_a_resume_supersedes(location, monkeypatch):
    monkeypatch.setattr(metric_writers, "PART_RECORDS", 3)
    first = metric_writers.JsonlWriter(location, start_step=0, flush_seconds=3600)
    for step in range(1, 8):
        first.write_scalars(step, {"loss": float(step)})
        if step == 4:  # a second record of the step stays in its part
            first.write_scalars(step, {"other": 1.0})
    # Only the full parts were written: a crash now loses steps 6 and 7, and nothing is half there.
    assert [r["step"] for r in metric_writers.read_metrics(location)] == [1, 2, 3, 4, 4, 5]
    first.close()
    assert storage.listdir(f"{location}/metrics") == [f"{s:012d}.jsonl" for s in (1, 4, 6)]
    # Resumed from a checkpoint at step 4: the part that starts after it goes, step 5 is logged again.
    second = metric_writers.JsonlWriter(location, start_step=4, flush_seconds=0)
    second.write_scalars(5, {"loss": 50.0})
    assert storage.listdir(f"{location}/metrics") == [f"{s:012d}.jsonl" for s in (1, 4, 5)]
    assert [(r["step"], r.get("loss")) for r in metric_writers.read_metrics(location)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (4, None), (5, 50.0)]


def test_an_appended_metrics_jsonl_of_an_older_run_reads_as_it_stands(tmp_path):
    lines = [f'{{"step": {s}, "loss": {v}}}' for s, v in ((1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0), (3, 30.0))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # resumed from step 1, appended
    assert losses_by_step(tmp_path) == {1: 1.0, 2: 20.0, 3: 30.0}
    assert [r["step"] for r in metric_writers.read_metrics(tmp_path)] == [1, 2, 3]
