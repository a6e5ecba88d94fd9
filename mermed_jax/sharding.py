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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
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


GRANULES = ("auto", "slice", "process")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, key: str = "mesh.shape",
                       unit: str = "devices") -> tuple[int, ...]:
    """Replaces one -1 by what the device (or granule) count leaves; errors name the config key."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{key}={shape}: expected {len(MESH_AXES)} sizes for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{key}={shape}: sizes must be positive, with at most one -1 (auto)")
    known = int(np.prod([s for s in shape if s != -1]))
    if num_devices % known:
        raise ValueError(f"{key}={shape} does not divide the {num_devices} {unit}")
    resolved = tuple(num_devices // known if s == -1 else s for s in shape)
    if int(np.prod(resolved)) != num_devices:
        raise ValueError(f"{key}={shape} covers {int(np.prod(resolved))} of the {num_devices} {unit}")
    return resolved


def _granules(devices: Sequence[jax.Device], granule: str, processes_per_granule: int) -> list[list[jax.Device]]:
    """Devices grouped by the unit the slow network (DCN) connects, in key order.

    A TPU slice is one granule (devices carry `slice_index`; `auto` takes slices when there are
    several); otherwise a granule is a node,
    i.e. `processes_per_granule` consecutive processes (1 with one process per node, the GPUs per
    node with one process per GPU: SLURM numbers tasks node by node).
    """
    if granule not in GRANULES:
        raise ValueError(f"mesh.granule={granule!r}: expected one of {GRANULES}")
    if processes_per_granule < 1:
        raise ValueError(f"mesh.processes_per_granule={processes_per_granule}: must be >= 1")
    has_slices = all(getattr(d, "slice_index", None) is not None for d in devices)
    if granule == "auto":  # CPU (and single-slice) processes all report slice 0
        granule = "slice" if has_slices and len({d.slice_index for d in devices}) > 1 else "process"
    if granule == "slice" and not has_slices:
        raise ValueError(f"mesh.granule='slice': {devices[0].platform} devices have no slice_index; use 'process'")

    def key(device: jax.Device) -> int:
        return device.slice_index if granule == "slice" else device.process_index // processes_per_granule

    groups: dict[int, list[jax.Device]] = {}
    for device in devices:
        groups.setdefault(key(device), []).append(device)
    return [groups[k] for k in sorted(groups)]


def device_grid(shape: Sequence[int], devices: Sequence[jax.Device], *, dcn_shape: Sequence[int] = (1, 1, 1),
                granule: str = "auto", processes_per_granule: int = 1) -> np.ndarray:
    """Devices arranged as the (data, fsdp, tensor) mesh: `shape` inside a granule (ICI: a TPU
    slice, a GPU node) times `dcn_shape` across granules, each axis of size shape[i] x dcn_shape[i].

    Putting data parallelism on DCN (dcn_shape=(slices, 1, 1)) keeps FSDP's all-gathers and the
    tensor axis's all-reduces on the fast links and sends only the gradient all-reduce between
    slices or nodes. Inside a granule devices are ordered by mesh_utils (TPU torus aware).
    """
    if all(int(n) == 1 for n in dcn_shape):  # one granule: no slice or process grouping needed
        granules = [list(devices)]
    else:
        granules = _granules(devices, granule, processes_per_granule)
    dcn = resolve_mesh_shape(dcn_shape, len(granules), "mesh.dcn_shape", unit="granules")
    sizes = {len(g) for g in granules}
    if len(sizes) != 1:
        raise ValueError(f"mesh.granule={granule!r}: granules hold different device counts {sorted(sizes)}")
    ici = resolve_mesh_shape(shape, sizes.pop())
    blocks = [mesh_utils.create_device_mesh(ici, g, allow_split_physical_axes=True) for g in granules]
    if len(blocks) == 1:
        return blocks[0]
    grid = np.empty(len(blocks), dtype=object)
    grid[:] = blocks
    return np.block(grid.reshape(dcn).tolist())


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None, **hybrid: Any) -> Mesh:
    """A Mesh over `devices` (default: all); `hybrid`: device_grid's DCN arguments."""
    devices = jax.devices() if devices is None else devices
    return Mesh(device_grid(shape, devices, **hybrid), MESH_AXES)


def mesh_from_config(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """make_mesh with the fields of a config's `mesh` section."""
    return make_mesh(mesh_config.shape, devices, dcn_shape=mesh_config.dcn_shape, granule=mesh_config.granule,
                     processes_per_granule=mesh_config.processes_per_granule)


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host batches -> global jax.Arrays split along dim 0 as `sharding` says (every host calls it)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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
