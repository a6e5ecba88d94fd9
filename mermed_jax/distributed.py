"""Starting JAX's multi-controller runtime from the environment.

Always initialised, even for one process: JAX's preemption sync point (the step at which every
host agrees to save after SIGTERM) only works through the distributed runtime's coordinator.
Sources, in order: explicit MERMED_COORDINATOR / MERMED_NUM_PROCESSES / MERMED_PROCESS_ID
(with optional MERMED_LOCAL_DEVICE_IDS, one process per GPU, and MERMED_CPU_COLLECTIVES=gloo
for several CPU processes), TPU pods and SLURM (JAX detects
both itself), and otherwise a single local process on a free port.
"""

import logging
import os
import socket

import jax


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize() -> None:
    """Idempotent; call before any other JAX work."""
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("MERMED_COORDINATOR"):
        if env.get("MERMED_CPU_COLLECTIVES"):  # e.g. gloo, for several CPU processes on one machine
            jax.config.update("jax_cpu_collectives_implementation", env["MERMED_CPU_COLLECTIVES"])
        local = env.get("MERMED_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=env["MERMED_COORDINATOR"],
            num_processes=int(env["MERMED_NUM_PROCESSES"]),
            process_id=int(env["MERMED_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    elif "TPU_WORKER_HOSTNAMES" in env or int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=1, process_id=0)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
