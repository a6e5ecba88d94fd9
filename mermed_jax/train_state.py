"""The train state pytree and the networks and optimiser built from a config.

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

from mermed_jax.models.head import HeadConfig, MultiCropNetwork
from mermed_jax.models.vit import ViTConfig
from mermed_jax.optim import make_optimizer
from mermed_jax.ssl.memory import MemoryState, init_memory

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


def backbone_config(config: ml_collections.ConfigDict, *, teacher: bool) -> ViTConfig:
    m = config.model
    return ViTConfig.from_variant(
        m.variant,
        width=m.get("width"), depth=m.get("depth"), num_heads=m.get("num_heads"), mlp_dim=m.get("mlp_dim"),
        img_size=m.img_size, num_registers=m.num_registers, layerscale_init=m.layerscale_init,
        drop_path_rate=0.0 if teacher else m.drop_path_rate,
        dtype=m.dtype, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
    )


def build_networks(config: ml_collections.ConfigDict) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student and teacher: the same architecture; the teacher has no stochastic depth."""
    head = HeadConfig(**config.head.to_dict())
    student = MultiCropNetwork(backbone_config(config, teacher=False), head, pool=config.model.pool)
    teacher = MultiCropNetwork(backbone_config(config, teacher=True), head, pool=config.model.pool)
    return student, teacher


def _dummy_crops(config: ml_collections.ConfigDict) -> list[jnp.ndarray]:
    c = config.crops
    return [jnp.zeros((1, 2, c.global_size, c.global_size, 3), jnp.float32)]


def abstract_params(config: ml_collections.ConfigDict) -> PyTree:
    """Unboxed parameter shapes, for building the optimiser without allocating anything."""
    student, _ = build_networks(config)
    variables = jax.eval_shape(
        lambda: student.init({"params": jax.random.key(0)}, _dummy_crops(config), train=False)
    )
    return nn.unbox(variables["params"])


def make_student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    depth = backbone_config(config, teacher=False).depth
    return make_optimizer(config.optim, abstract_params(config), depth)


def init_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    """A fresh state with boxed (logically named) leaves; the teacher starts as the student."""
    student, _ = build_networks(config)
    param_rng, memory_rng = jax.random.split(rng)
    variables = student.init({"params": param_rng}, _dummy_crops(config), train=False)
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
