"""Multi-host on one machine: 2 JAX processes x 4 CPU devices, started by launch/local_multiprocess.sh.

1. From TFRecord shards, 10 steps straight, against 5 steps, stop, resume to 10: the resumed run
   equals its own uninterrupted run bit for bit (checkpoints written and read by both hosts,
   each host's Grain iterator restored, metrics from host 0 only).
2. Fed the same global arrays (built in tests/_fed_steps.py, not read from files), 2 processes x
   4 devices equal 1 process x 8 devices on the same (2, 4, 1) mesh: the loss at 1e-5 and every
   parameter, teacher and memory leaf at 1e-5 relative, the keys' part of the qkv bias left out
   (its gradient is identically zero; see tests/test_sharding.py).
About 2 minutes each on an idle 2-core machine. gloo gives the processes a fixed 30 s to meet at
a collective, so both programs compile their step first and meet at a coordination barrier
before running it (docs/pods.md).
"""

import os
import subprocess

import jax
import numpy as np
import pytest
from job_outputs import losses_by_step
from repo import ROOT

from data_pipelines.modalities import MODALITIES
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax.training import checkpointing

LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(2400)]


def _launch(tmp_path, processes: int, devices: int, args: list[str], module: str = "mermed_jax.pretrain"):
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")),
               PYTHONPATH=str(ROOT), MERMED_LOG_DIR=str(tmp_path / "logs"),
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir))
    for key in ("XLA_FLAGS", "PYTEST_CURRENT_TEST"):
        env.pop(key, None)
    done = subprocess.run(["bash", str(LAUNCH), "-n", str(processes), "-d", str(devices), "-m", module, "--", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, done.stderr[-3000:] + logs
    return done


def _pretrain_args(workdir, data_dirs, max_steps: int) -> list[str]:
    overrides = {
        "data.dirs": repr(tuple(data_dirs)), "max_steps": max_steps, "log_every_steps": 1,
        "checkpoint.every_steps": 5, "crops.num_local": 2, "model.depth": 1,
        # each process a DCN granule, as a node would be: data across processes, fsdp inside one
        "mesh.shape": "(1,4,1)", "mesh.dcn_shape": "(2,1,1)", "mesh.granule": "process",
    }
    return ["--config=configs/demo_cpu.py", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def test_two_hosts_resume_exactly(tmp_path):
    data = tmp_path / "data"
    write_demo_data(data, images_per_modality=24, size=40, seed=0, shard_size=8)
    dirs = [str(data / f"demo_{m}") for m in MODALITIES]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch(tmp_path, 2, 4, _pretrain_args(straight, dirs, 10))
    _launch(tmp_path, 2, 4, _pretrain_args(resumed, dirs, 5))
    _launch(tmp_path, 2, 4, _pretrain_args(resumed, dirs, 10))

    state_a, _, step_a = checkpointing.load_train_state(straight)
    state_b, _, step_b = checkpointing.load_train_state(resumed)
    assert step_a == step_b == 10
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses_a, losses_b = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(losses_a) == list(range(1, 11))
    assert losses_a == losses_b
    # every host saved its own data iterator; only host 0 wrote metrics
    data_items = sorted(p.name for p in (straight / "checkpoints" / "10" / "data").glob("process_*"))
    assert data_items == ["process_0-of-2.json", "process_1-of-2.json"]
    assert len(list(straight.glob("events.out.tfevents*"))) == 1


def test_two_hosts_equal_one_host_on_the_same_arrays(tmp_path):
    _launch(tmp_path, 2, 4, [str(tmp_path / "two.npz")], module="tests._fed_steps")
    _launch(tmp_path, 1, 8, [str(tmp_path / "one.npz")], module="tests._fed_steps")
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    compared = 0
    for name in one.files:
        if not name.startswith((".params", ".teacher_params", ".memory")):
            continue
        a, b = one[name].astype(np.float64), two[name].astype(np.float64)
        if name.endswith("['attn']['qkv']['bias']"):
            a, b = np.delete(a, 1, axis=0), np.delete(b, 1, axis=0)
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(a), 1e-30), name
        compared += 1
    assert compared > 10
