"""The evaluation sweep end to end on tiny demo data: an Orbax checkpoint's teacher, a random-init
network and raw pixels x 2 datasets x 2 label fractions x 2 seeds x (linear, kNN); then resuming a
partial sweep, the report, the 70/15/15 split of a dataset that has no splits of its own, and a
protocol registered outside the package that runs from its config line alone."""

import csv
import dataclasses
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax import evaluate, sharding
from mermed_jax.eval import encoders, inputs, protocols, report, sweep
from mermed_jax.eval.eval_config import eval_recipe, validate
from mermed_jax.training import train_state

DATASETS = ("demo_ct", "demo_cxr")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("eval_data")
    write_demo_data(out, images_per_modality=32, size=16, seed=0, shard_size=16)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_root, tiny_config) -> pathlib.Path:
    """A pretraining workdir as pretrain.py leaves it: config.json and an Orbax checkpoint."""
    config = tiny_config("model.depth=1,model.img_size=16,crops.global_size=16,crops.local_size=8")
    config.data.dirs = tuple(str(demo_root / d) for d in DATASETS)
    workdir = tmp_path_factory.mktemp("pretrain")
    (workdir / "config.json").write_text(config.to_json_best_effort())
    state = nn.unbox(train_state.init_train_state(config, jax.random.key(3)))
    manager = ocp.CheckpointManager(workdir / "checkpoints", item_handlers={"state": ocp.StandardCheckpointHandler()})
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    return workdir


@protocols.register("mean_feature", inputs=inputs.feature_splits, features=inputs.frozen_features,
                    deterministic=True)
def _nearest_class_mean(config, row: protocols.Row) -> protocols.Scores:
    """A toy protocol, registered here and nowhere else: a softmax over minus the distance from each
    test feature to each class's mean training feature."""
    f, classes = row.key["feature"], range(len(row.dataset.label_names))
    means = np.stack([row.train.features[f][row.train.labels == c].mean(0) for c in classes])
    distance = np.linalg.norm(row.test.features[f][:, None] - means[None], axis=-1)
    logits = -distance / distance.mean()
    odds = np.exp(logits - logits.max(1, keepdims=True))
    return protocols.Scores(odds / odds.sum(1, keepdims=True))


def _config(demo_root):
    config = eval_recipe()
    config.datasets.update({d: str(demo_root / d) for d in DATASETS})
    config.protocols = ("linear", "knn")
    config.label_fractions = (0.5, 1.0)
    config.seeds = (0, 1)
    config.data.update(dict(image_size=16, crop_fraction=1.0, batch_size=16))
    config.linear.cs = (0.1, 1.0)
    config.bootstrap.resamples = 50
    validate(config)
    return config


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_end_to_end_then_resume(tmp_path, demo_root, workdir, monkeypatch):
    config = _config(demo_root)
    teacher = encoders.from_checkpoint(workdir, None)
    assert teacher.tag == "step_000007" and encoders.checkpoint_steps(workdir) == [7]
    eval_dir = tmp_path / "eval"
    text = evaluate.evaluate(config, [teacher], eval_dir)

    rows = _read(eval_dir / "results.csv")
    # per encoder and dataset: 2 protocols x (fraction 0.5 x 2 seeds + fraction 1 once) = 6 rows
    assert len(rows) == 3 * 2 * 6
    assert {r["encoder"] for r in rows} == {"step_000007", "random", "pixels"}
    assert len({sweep.row_key(r) for r in rows}) == len(rows)
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0 and r["n_test"] != "0"
        assert json.loads(r["per_class_auroc"]).keys() == {"blobs", "stripes", "checker", "rings"}
    half = [r for r in rows if r["label_fraction"] == "0.5"]
    assert {r["n_train"] for r in half} < {r["n_train"] for r in rows}
    assert "| demo_ct | ct |" in text and "step_000007" in text and "random" in text and "pixels" in text
    for plot in ("auroc_bars.png", "roc_curves.png", "auroc_vs_fraction.png", "embedding_map.png"):
        assert (eval_dir / plot).stat().st_size > 0
    assert (eval_dir / "features" / "step_000007" / "demo_ct" / "test.npz").is_file()

    # Drop 5 rows, as if the job had died: a rerun runs exactly those and nothing else.
    with open(eval_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, sweep.COLUMNS)
        writer.writeheader()
        writer.writerows(rows[:-5])
    calls = []
    run_row = sweep.run_row
    monkeypatch.setattr(sweep, "run_row", lambda *a, **k: calls.append(a[1]) or run_row(*a, **k))
    evaluate.evaluate(config, [teacher], eval_dir)
    assert sorted(sweep.row_key(k) for k in calls) == sorted(sweep.row_key(r) for r in rows[-5:])
    again = _read(eval_dir / "results.csv")
    assert sorted(map(sweep.row_key, again)) == sorted(map(sweep.row_key, rows))
    summary = report.summarize(again)
    seeded = [s for s in summary if s["label_fraction"] == "0.5"]
    assert seeded and all(s["seeds"] == 2 and s["ci"] == "t over 2 seeds" for s in seeded)


def test_dataset_without_splits_is_split_70_15_15(tmp_path, demo_root, workdir):
    directory = tmp_path / "train_only"
    shutil.copytree(demo_root / "demo_us", directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    for split in ("val", "test"):
        del manifest["splits"][split]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    config = _config(demo_root)
    dataset = inputs.describe("train_only", str(directory))
    assert not dataset.native_splits
    teacher = encoders.from_checkpoint(workdir, 7)
    splits = inputs.feature_splits(config, dataset, teacher, tmp_path / "eval", sharding.make_mesh((-1, 1, 1)))
    train_count = manifest["splits"]["train"]["num_records"]
    sizes = [len(splits[s].labels) for s in inputs.SPLITS]
    assert sum(sizes) == train_count and sizes[0] > sizes[1] > 0 and sizes[2] > 0
    assert all(len(np.unique(splits[s].labels)) == 4 for s in inputs.SPLITS)


def test_checkpoint_choice_and_watch(tmp_path, demo_root, workdir, capsys):
    config = _config(demo_root)
    config.protocols = ("knn",)
    config.label_fractions = (1.0,)
    config.baselines = ()
    config.plots = False
    assert evaluate._checkpoint_steps(config, str(workdir), None) == [7]
    config.checkpoints = "all"
    assert evaluate._checkpoint_steps(config, str(workdir), None) == [7]
    with pytest.raises(FileNotFoundError, match=r"no step \[8\] \(have \[7\]\)"):
        evaluate._checkpoint_steps(config, str(workdir), 8)
    config.watch.update(dict(poll_seconds=0.05, idle_timeout_seconds=0.5))
    evaluate.watch(config, str(workdir), tmp_path / "watch")  # evaluates step 7, then stops when idle
    rows = _read(tmp_path / "watch" / "results.csv")
    assert {r["encoder"] for r in rows} == {"step_000007"} and len(rows) == 2
    assert "step_000007" in capsys.readouterr().out


def test_exported_encoder_gives_the_checkpoint_features(tmp_path, demo_root, workdir):
    from mermed_jax.interop.weight_export import export_params

    teacher = encoders.from_checkpoint(workdir, 7)
    export_params(teacher.params, None, teacher.config, tmp_path / "teacher.msgpack", "msgpack",
                  pixel_mean=teacher.pixel_mean, pixel_std=teacher.pixel_std)
    exported = encoders.from_export(tmp_path / "teacher.msgpack")
    assert exported.tag == "export_teacher" and exported.config == teacher.config
    config = _config(demo_root)
    dataset = inputs.describe("demo_ct", str(demo_root / "demo_ct"))
    mesh = sharding.make_mesh((-1, 1, 1))
    a = inputs.feature_splits(config, dataset, teacher, tmp_path / "a", mesh)["test"]
    b = inputs.feature_splits(config, dataset, exported, tmp_path / "b", mesh)["test"]
    np.testing.assert_allclose(a.features["cls"], b.features["cls"], atol=1e-6)


def test_feature_cache_is_keyed_by_the_weights(tmp_path, demo_root, workdir):
    from mermed_jax.eval.features import cached_features

    teacher = encoders.from_checkpoint(workdir, 7)
    data = inputs.pipeline_config(_config(demo_root), str(demo_root / "demo_ct"), "test", 16, 1.0)
    mesh = sharding.make_mesh((-1, 1, 1))
    first = cached_features(tmp_path, teacher, "demo_ct", data, mesh)
    np.testing.assert_array_equal(cached_features(tmp_path, teacher, "demo_ct", data, mesh).features["cls"],
                                  first.features["cls"])
    # Same tag (a rerun pretraining reaches step 7 again), other weights: recomputed, not reused.
    other = dataclasses.replace(teacher, params=jax.tree.map(lambda x: x * 1.5, teacher.params))
    assert not np.allclose(cached_features(tmp_path, other, "demo_ct", data, mesh).features["cls"], first.features["cls"])


def test_multiblock_features_are_the_last_blocks_cls_and_the_patch_mean(demo_root, workdir):
    """DINO's probe features on the depth-1 test network: its one block's CLS (which is `cls`), then the
    mean patch token (test_vit checks that every block's CLS is there, the last one equal to `cls`)."""
    from mermed_jax.eval.features import extract

    teacher = encoders.from_checkpoint(workdir, 7)
    data = inputs.pipeline_config(_config(demo_root), str(demo_root / "demo_ct"), "test", 16, 1.0)
    found = extract(teacher, data, sharding.make_mesh((-1, 1, 1))).features
    width = teacher.config.width
    assert found["multiblock"].shape == (len(found["cls"]), (teacher.config.depth + 1) * width)
    np.testing.assert_allclose(found["multiblock"][:, -2 * width:-width], found["cls"], atol=1e-6)
    np.testing.assert_allclose(found["multiblock"][:, -width:], found["patch_mean"], atol=1e-6)
