"""Starting JAX's multi-controller runtime from the environment.

Always initialised, even for one process: JAX's preemption sync point (the step at which every
host agrees to save after SIGTERM) only works through the distributed runtime's coordinator.
Sources, in order: explicit MERMED_COORDINATOR / MERMED_NUM_PROCESSES / MERMED_PROCESS_ID,
TPU pods and SLURM (JAX detects both itself), and otherwise a single local process on a free
port. MERMED_LOCAL_DEVICE_IDS (one process per GPU) and MERMED_CPU_COLLECTIVES=gloo (several CPU
processes) apply to all of them.
"""

import logging
import os
import socket
from collections.abc import Mapping

import jax


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """Which of this process's visible devices it drives, where JAX's own guess is wrong.

    Under SLURM JAX gives each task the one device [SLURM_LOCALID], right only when every task
    sees all of its node's GPUs. srun's --gpus-per-task (launch/slurm_gpu.sbatch) shows each task
    only its own GPUs, renumbered from 0: a task of one GPU per task would ask for a device it
    cannot see, and one task per node would drive 1 of its 8 GPUs. MERMED_LOCAL_DEVICE_IDS wins.
    """
    if env.get("MERMED_LOCAL_DEVICE_IDS"):
        return [int(i) for i in env["MERMED_LOCAL_DEVICE_IDS"].split(",")]
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if "SLURM_PROCID" in env and visible and (len(visible) == 1 or env.get("SLURM_NTASKS_PER_NODE") == "1"):
        return list(range(len(visible)))
    return None


def initialize() -> None:
    """Idempotent; call before any other JAX work."""
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("MERMED_CPU_COLLECTIVES"):  # e.g. gloo, for several CPU processes on one machine
        jax.config.update("jax_cpu_collectives_implementation", env["MERMED_CPU_COLLECTIVES"])
    if env.get("MERMED_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["MERMED_COORDINATOR"],
            num_processes=int(env["MERMED_NUM_PROCESSES"]),
            process_id=int(env["MERMED_PROCESS_ID"]),
            local_device_ids=_local_device_ids(env),
        )
    elif "TPU_WORKER_HOSTNAMES" in env or int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(local_device_ids=_local_device_ids(env))
    else:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=1, process_id=0)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process arrives, through the coordination service (no device collective).

    Used after compiling the train step: CPU processes' gloo collectives give their peers a fixed
    30 s to join the first collective, which one process's slower compile can exceed.
    """
    if jax.process_count() == 1:
        return
    from jax._src import (
        distributed as jax_distributed,  # the barrier JAX's own serialization uses
    )

    jax_distributed.global_state.client.wait_at_barrier(f"mermed_{name}", timeout_in_ms=timeout_s * 1000)
