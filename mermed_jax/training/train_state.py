"""The train state pytree and the student optimiser built from a config.

Everything that must survive a restart lives in TrainState: student and teacher parameters, the
head's BatchNorm statistics, the optimiser state, the memory, the step and the counts of skipped
non-finite steps (in all, and in the current streak). Parameters come out of `init_train_state` boxed with logical axis names, so
that sharding.create_sharded can create them directly on their shards.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mermed_jax.models.networks import (
    abstract_params,
    backbone_config,
    build_networks,
    dummy_crops,
)
from mermed_jax.ssl.memory import MemoryState, init_memory
from mermed_jax.training.optim import make_optimizer

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    step: jnp.ndarray  # int32 scalar: optimiser steps taken
    params: PyTree  # student {'backbone', 'head'}
    teacher_params: PyTree
    batch_stats: PyTree  # student head BatchNorm running statistics
    teacher_batch_stats: PyTree
    opt_state: optax.OptState
    memory: MemoryState
    skipped_steps: jnp.ndarray  # int32 scalar: updates dropped for non-finite loss or gradients
    nonfinite_streak: jnp.ndarray  # int32 scalar: consecutive dropped updates up to this step


def make_student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    depth = backbone_config(config, teacher=False).depth
    return make_optimizer(config.optim, abstract_params(config), depth)


def init_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """A fresh state with boxed (logically named) leaves; the teacher starts as the student."""
    student, _ = build_networks(config)
    param_rng, memory_rng = jax.random.split(rng)
    variables = student.init({"params": param_rng}, dummy_crops(config), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    memory = init_memory(memory_rng, config.memory.size, config.head.bottleneck_dim, config.memory.num_shards)
    memory = MemoryState(
        queue=nn.LogicallyPartitioned(memory.queue, ("memory_shard", None, None)),
        ids=nn.LogicallyPartitioned(memory.ids, ("memory_shard", None)),
        ptr=nn.LogicallyPartitioned(memory.ptr, ("memory_shard",)),
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        teacher_params=jax.tree.map(jnp.copy, params),
        batch_stats=batch_stats,
        teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        opt_state=make_student_optimizer(config).init(params),
        memory=memory,
        skipped_steps=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
