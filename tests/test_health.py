"""The health report reads a run's logged signals and its checkpoints' probe AUROC back."""

import json
import math

import pytest

from mermed_jax import health
from mermed_jax.eval import sweep


def _run(tmp_path, tiny_config):
    config = tiny_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    (tmp_path / "metrics").mkdir()
    lines = [dict(step=step, time=0.0, loss=6.0 - step / 100, teacher_entropy=2.0 + step / 100, student_entropy=5.0,
                  teacher_embedding_std=0.05, student_embedding_std=0.04,
                  **{"memory_loss/cxr": 5.5, "memory_loss/oct": float("nan"), "memory_fill/cxr": 0.25,
                     "memory_fill/ct": 0.25, "memory_fill/oct": 0.0, "memory_fill/empty": 0.5})
             for step in (25, 50, 75, 100)]
    (tmp_path / "metrics" / "000000000025.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return config


def test_table_and_plot_of_a_run_with_a_probe_curve(tmp_path, tiny_config, capsys):
    config = _run(tmp_path, tiny_config)
    rows = [dict(encoder=f"step_{step:06d}", dataset=d, protocol="knn", feature="multiblock", label_fraction="1.0",
                 seed="0", auroc=str(auroc)) for step, d, auroc in
            [(50, "a", 0.6), (50, "b", 0.8), (100, "a", 0.7), (100, "b", 0.9)]]
    rows.append(dict(encoder="random", dataset="a", protocol="knn", feature="multiblock", label_fraction="1.0",
                     seed="0", auroc="0.5"))
    (tmp_path / "eval" / "curve").mkdir(parents=True)
    sweep.write_csv(tmp_path / "eval" / "curve" / sweep.RESULTS_FILE, list(rows[0]), rows)

    health.main(["--workdir", str(tmp_path), "--eval_name", "curve"])
    out = capsys.readouterr().out
    assert (tmp_path / "health.png").stat().st_size > 10_000
    header, _, *body = [line for line in out.splitlines() if line.startswith("|")]
    assert header.split(" | ")[-2:] == ["memory_loss/cxr", "probe AUROC |"]  # oct's NaNs are no column
    assert [line.split(" | ")[0] for line in body] == ["| 25", "| 50", "| 75", "| 100"]
    assert body[-1].split(" | ")[1:3] == ["5.000", "3.000"] and body[-1].endswith("0.800 (step 100) |")
    refs = health.references(str(tmp_path), health.series(health.read_metrics(str(tmp_path))))
    assert refs["spread"] == pytest.approx(config.head.bottleneck_dim ** -0.5)
    assert refs["entropy_gated"] == pytest.approx(math.log(config.memory.partition_size / 2))  # cxr and ct


def test_a_run_that_logged_nothing_is_named(tmp_path, tiny_config):
    _run(tmp_path, tiny_config)
    (tmp_path / "metrics" / "000000000025.jsonl").write_text("")
    with pytest.raises(SystemExit, match=f"{tmp_path}: no logged loss"):
        health.main(["--workdir", str(tmp_path)])
