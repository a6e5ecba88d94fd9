"""Every sharding decision of the project: the mesh, the logical-axis rules, and the shardings of
the train state and the batch. Other modules only name logical axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters, optimiser
state and the memory queue sharded), `tensor` (heads and MLP hidden units split). The batch is
split over data x fsdp. Parameter names: `embed`, `mlp`, `heads`, `kv`, `layers`, `bottleneck`;
activation names carry an `act_` prefix so that an activation's batch and embed axes never claim
the same mesh axis; `memory_shard` is the logical-shard axis of the memory queue.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("bottleneck", None),
    ("memory_shard", BATCH_AXES),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 by what the device count leaves; errors name the `mesh` config key."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: sizes must be positive, with at most one -1 (auto)")
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
        raise ValueError(f"mesh.shape={shape} does not divide the {num_devices} devices")
    resolved = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(resolved)) != num_devices:
        raise ValueError(f"mesh.shape={shape} covers {int(np.prod(resolved))} of the {num_devices} devices")
    return resolved


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """Mesh shardings for a tree whose leaves may be nn.LogicallyPartitioned (others replicate)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def create_sharded(init_fn: Callable[[], Any], mesh: Mesh) -> tuple[Any, Any]:
    """Runs `init_fn` (which returns boxed leaves) so that every array is born on its shards.

    Returns (unboxed tree, its shardings). Nothing is materialised on one device first, which is
    what lets a model larger than one device's memory start.
    """
    abstract = jax.eval_shape(init_fn)
    shardings = logical_shardings(abstract, mesh)
    tree = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
    return tree, shardings


class _DenseGeneralPartitioned(nn.LogicallyPartitioned):
    """A logically partitioned DenseGeneral kernel or bias.

    flax's DenseGeneral initialises its kernel (and bias) flattened and unboxes it before reshaping,
    which applies the full-rank partitioning to the flat value and fails under a mesh; this box
    skips the constraint while the ranks differ (the reshaped value is constrained as usual).
    """

    def unbox(self, apply_constraint: bool = True) -> Any:
        if np.ndim(self.value) != len(self.names):
            return self.value
        return super().unbox(apply_constraint)


def dense_general_partitioning(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """nn.with_logical_partitioning for DenseGeneral parameters (see _DenseGeneralPartitioned)."""

    def boxed(*args: Any, **kwargs: Any) -> _DenseGeneralPartitioned:
        return _DenseGeneralPartitioned(init(*args, **kwargs), names)

    return boxed


@contextlib.contextmanager
def axis_rules_context(mesh: Mesh) -> Iterator[None]:
    """The context under which modules' logical constraints resolve to this mesh.

    flax 0.12 emits logical constraints (the `act_*` activation shardings) only under an
    abstract mesh, so that is set as well as the legacy `with mesh:`. Without the constraints XLA
    keeps scanned layers' activations replicated and all-reduces them in every matmul under FSDP.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`with mesh:` context manager has been deprecated", DeprecationWarning)
        mesh.__enter__()
    try:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
            yield
    finally:
        mesh.__exit__(None, None, None)
