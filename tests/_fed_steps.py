"""Train steps on global arrays built here, not read from files: run once as 1 process with 8
devices and once as 2 processes x 4 devices (launch/local_multiprocess.sh), and compare.

  python -m tests._fed_steps OUT.npz    (MERMED_* variables as local_multiprocess.sh sets them)

It runs from the repository root as the module tests._fed_steps, so it imports tests/repo.py as tests.repo.

Every process builds the same global batches from one seed and hands make_array_from_process_local_data
the rows of its own devices. Process 0 writes the losses and the whole state (gathered to host) to OUT.
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from mermed_jax import distributed, sharding
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import train_state, train_step
from tests.repo import pixel_stats, tiny_config_dict

ARGS = ("model.depth=1,crops.num_local=2,batch=16,memory=48,partition=16,shards=8,head.use_bn=False,"
        "crops.global_size=16,crops.local_size=8,model.img_size=16")
STEPS = 5
MEAN, STD = pixel_stats()


def main(out: str) -> None:
    distributed.initialize()
    config = tiny_config_dict(ARGS)
    mesh = sharding.make_mesh((2, 4, 1))
    state, shardings = sharding.create_sharded(lambda: train_state.init_train_state(config, jax.random.key(0)), mesh)
    step = train_step.jit_train_step(train_step.make_train_step(config, MEAN, STD, mesh=mesh), mesh, shardings)
    schedules = build_schedules(config)
    batch_sharding = sharding.batch_sharding(mesh)
    # compiled before the first collective and a barrier after, as pretrain does (gloo's 30 s rendezvous)
    step = step.lower(state, train_step.abstract_batch(config, batch_sharding), jax.random.key(1),
                      schedules.at(3)).compile()
    distributed.barrier("fed_steps_compiled")
    rows = config.global_batch // jax.process_count()
    start = jax.process_index() * rows  # jax.devices() lists process 0's devices first
    losses = []
    rng = np.random.default_rng(0)
    for i in range(STEPS):
        batch = train_step.random_batch(config, rng, num_modalities=3)
        local = {k: v[start:start + rows] for k, v in batch.items()}
        state, metrics = step(state, sharding.to_global(local, batch_sharding), jax.random.key(1), schedules.at(i + 3))
        losses.append(float(metrics["loss"]))
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    leaves = multihost_utils.process_allgather(list(leaves), tiled=True)
    if jax.process_index() == 0:
        names = [jax.tree_util.keystr(p) for p in paths]
        np.savez(out, losses=np.asarray(losses), **{name: np.asarray(x) for name, x in zip(names, leaves)})


if __name__ == "__main__":
    main(sys.argv[1])
