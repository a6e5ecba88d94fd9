"""A stand-in pretraining job for fault injection: checkpoints through mermed_jax.training.checkpointing.

  python tests/_checkpoint_job.py WORKDIR LAST_STEP    (from the repository root)

Each step saves a 1 MB state, a Grain iterator and the meta through the job's own manager, options
and save/restore functions, then resumes from the latest complete checkpoint when restarted,
checking that the state and the iterator position restored exactly (the state at step s is a pure
function of s). It starts in about two seconds, where the real job compiles for half a minute, so
a test can kill it at many points. Prints "resumed S" and "saved S" (flushed) as it goes.
The helpers below start it and watch its checkpoints; the fault tests share them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

from repo import ROOT

META = {"seed": 0, "process_count": 1, "host_batch": 1}


def state_at(step: int) -> dict:
    import numpy as np  # noqa: PLC0415 - the helpers below run in the test process without jax

    rng = np.random.default_rng(step)
    return {"params": rng.standard_normal((512, 512)).astype(np.float32), "step": np.int32(step)}


def run(workdir: str, last_step: int) -> None:
    import grain  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from mermed_jax.training import checkpointing  # noqa: PLC0415

    options = ml_collections.ConfigDict(dict(keep=3, keep_period=None, async_save=True))
    manager = checkpointing.make_manager(pathlib.Path(workdir), options)
    data = iter(grain.MapDataset.range(10**9).to_iter_dataset())
    start = manager.latest_step() or 0
    if start:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state_at(start))
        restored = checkpointing.restore(manager, start, abstract, data, META)
        for name, value in state_at(start).items():
            np.testing.assert_array_equal(np.asarray(restored.state[name]), value)
        print(f"resumed {start}", flush=True)
    for step in range(start + 1, last_step + 1):
        if next(data) != step - 1:
            raise AssertionError(f"data iterator at the wrong position for step {step}")
        checkpointing.save(manager, step, jax.device_put(state_at(step)), data, META)
        print(f"saved {step}", flush=True)
    manager.wait_until_finished()
    manager.close()


def command(workdir: pathlib.Path, last_step: int) -> list[str]:
    # run as a script, so that tests/ is on its sys.path for `repo`, as in the test process
    return [sys.executable, str(ROOT / "tests" / "_checkpoint_job.py"), str(workdir), str(last_step)]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def start(workdir: pathlib.Path, last_step: int = 10**6, preexec_fn=None) -> subprocess.Popen:
    """The job in its own process group (so a kill takes all of it), stdout and stderr piped."""
    return subprocess.Popen(command(workdir, last_step), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the job")
        time.sleep(poll)


def saving_now(workdir: pathlib.Path) -> bool:
    """A save is in flight: Orbax writes under a temporary name and renames it when complete."""
    return any((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
