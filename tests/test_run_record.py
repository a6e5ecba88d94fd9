"""A run's input contract and length are fixed at its first start and kept for life (run.json)."""

import json
import logging
import shutil

import numpy as np
import pytest

from data_pipelines import normalization, stats
from data_pipelines.modalities import modality_id
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax.eval import encoders
from mermed_jax.training import run_record


def _data(root, seed, size):
    write_demo_data(root, images_per_modality=16, size=size, seed=seed, shard_size=64)
    return tuple(str(root / f"demo_{m}") for m in ("ct", "derm"))


def test_the_official_constants_are_the_default_and_name_the_projects_modalities(tiny_config):
    config = tiny_config("pixel_stats.source='official'")
    mean, std, source = run_record.pixel_stats(config)
    assert source == "official"
    np.testing.assert_allclose(mean[modality_id("oct")], [0.19832779] * 3, rtol=1e-6)
    np.testing.assert_allclose(std[modality_id("path")], [0.24855434, 0.27136655, 0.24570293], rtol=1e-6)
    np.testing.assert_allclose(mean[modality_id("derm")], [0.66138601, 0.51889024, 0.47144768], rtol=1e-6)
    config.pixel_stats.given = {"ct": ((0.4,), (0.2,))}
    mean, std, source = run_record.pixel_stats(config)
    assert source == "official+given" and mean[modality_id("ct")].tolist() == pytest.approx([0.4] * 3)


def test_resume_with_other_data_keeps_the_saved_record_and_says_so(tmp_path, tiny_config, caplog):
    first = _data(tmp_path / "a", seed=0, size=16)
    config = tiny_config("pixel_stats.source='measured',num_train_images=None,global_batch=8")
    config.data.dirs = first
    record = run_record.settle(tmp_path / "w", config, resuming=False)
    saved = json.loads((tmp_path / "w" / run_record.RUN_RECORD).read_text())
    assert saved["pixel_stats_source"] == "measured" and saved["steps_per_epoch"] == record.steps_per_epoch
    np.testing.assert_allclose(record.stats()[0], stats.measured_stats(first)[0], rtol=1e-6)

    config.data.dirs = first + _data(tmp_path / "b", seed=1, size=24)  # more data, other statistics
    assert run_record.plan(config) != record
    with caplog.at_level(logging.WARNING):
        resumed = run_record.settle(tmp_path / "w", config, resuming=True)
    assert resumed == record
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "pixel_mean" in warned and "steps_per_epoch" in warned and "keeping the run's value" in warned


def test_evaluation_reads_the_record_with_the_training_data_gone(tmp_path, tiny_config):
    dirs = _data(tmp_path / "data", seed=0, size=16)
    config = tiny_config("pixel_stats.source='measured'")
    config.data.dirs = dirs
    record = run_record.settle(tmp_path / "w", config, resuming=False)
    shutil.rmtree(tmp_path / "data")
    mean, std = encoders.pixel_statistics(tmp_path / "w", config, "pretrain")
    np.testing.assert_array_equal(mean, record.stats()[0])
    np.testing.assert_array_equal(std, record.stats()[1])
    np.testing.assert_array_equal(encoders.pixel_statistics(tmp_path / "w", config, "official")[0],
                                  normalization.table("official")[0])


def test_a_workdir_from_before_records_measures_its_data_or_says_what_is_missing(tmp_path, tiny_config):
    dirs = _data(tmp_path / "data", seed=0, size=16)
    config = tiny_config()
    config.data.dirs = dirs
    (tmp_path / "old").mkdir()
    mean, _ = encoders.pixel_statistics(tmp_path / "old", config, "pretrain")  # as its training did
    np.testing.assert_allclose(mean, stats.measured_stats(dirs, fallback="imagenet")[0])
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="run.json"):
        encoders.pixel_statistics(tmp_path / "old", config, "pretrain")


def test_a_damaged_record_is_an_error_naming_the_file(tmp_path):
    (tmp_path / run_record.RUN_RECORD).write_text("{not json")
    with pytest.raises(ValueError, match="run.json"):
        run_record.load(tmp_path)


def test_resuming_a_run_from_before_records_keeps_the_statistics_it_trained_with(tmp_path, tiny_config):
    dirs = _data(tmp_path / "data", seed=0, size=16)
    config = tiny_config()  # pixel_stats.source: official, yet the old run measured its data
    config.pixel_stats.source = "official"
    config.data.dirs = dirs
    record = run_record.settle(tmp_path / "old", config, resuming=True)
    assert record.pixel_stats_source == run_record.LEGACY_SOURCE
    np.testing.assert_allclose(record.stats()[0], stats.measured_stats(dirs, fallback="imagenet")[0], rtol=1e-6)
    assert run_record.load(tmp_path / "old") == record
