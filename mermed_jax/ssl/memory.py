"""The FIFO memory of teacher embeddings, as functional state laid out in logical shards.

The queue holds K rows as [S, K/S, d]: S logical shards of K/S rows, each with its own pointer.
Every step each logical shard receives B/S of the B new embeddings (batch rows are assigned to
shards contiguously). Nothing here depends on the number of devices: two runs with the same S
produce the same queue on any mesh, which is what makes checkpoints portable across meshes.
Shards start as random unit vectors with modality id -1, like the official code; those rows take
part in the logits until overwritten.

On a mesh (pass `mesh`), the shard axis and the batch are split over the same N = data x fsdp
devices (S is a multiple of N), so device i holds logical shards [i S/N, (i+1) S/N) and batch rows
[i B/N, (i+1) B/N), which are exactly the rows those shards receive. `enqueue` and
`stratified_partition` therefore run under shard_map with no communication at all: each device
writes its own shards at their own pointers and draws its own shards' permutations. (Left to XLA,
a dynamic_update_slice at a moving position into a sharded array all-gathers the whole queue.)
Without a mesh the same per-shard code runs on the whole array, so both paths give equal results.

The partition is stratified, a deliberate difference from the official code. The official
RandomPartition draws one uniform random permutation of the K columns and cuts it into blocks of
P; ours gives every block P/S random columns of each logical shard. Why: a stratified block has
exactly P/N columns on each of the N devices, so the sharded loss gathers one block's P x d keys
at a time with static shapes and never holds the queue (memory_loss.py). A uniform block has a
random number of columns on each device; the static-shape ways to run it sharded are to all-gather
the whole K x d queue (replicated on every device through the backward pass) or to psum a
zero-filled P x d buffer per block (twice the stratified bytes on the wire, N x its operand
bytes). bench/partition_schemes.py measures all three on 8 simulated CPU devices (K 16384, P 2048,
B 64, d 256, full memory so gating is on): received bytes per device and step, stratified 29.5 MB,
queue all-gather 14.7 MB (half: one gather, no remat) with 2.6x the temp memory (21.9 vs 8.6 MB),
per-block psum 58.9 MB; loss + gradient times within noise on that shared 2-core CPU (best of 21:
110, 111, 121 ms); the loss agrees in expectation (difference of the means over 32 partition
seeds 1e-4 = 1.5 standard errors, 2e-5 of the loss; 0.8 standard errors with the initial,
ungated memory; mean |difference| per seed 2.4e-4, the size of the seed-to-seed spread of either
scheme). So the choice costs no fidelity one can measure, and keeps the loss's per-device memory
at one block whatever K (the replicated queue alone would be 134 MB per device at the paper's
K = 131,072, d = 256). The two schemes differ only in which columns share a block (every column
is in every block equally often under both; tests/test_memory.py). The uniform scheme lives in
the benchmark only.
"""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from data_pipelines.modalities import EMPTY_MODALITY_ID, NUM_MODALITIES
from mermed_jax.sharding import BATCH_AXES, num_batch_shards


class MemoryState(flax.struct.PyTreeNode):
    queue: jnp.ndarray  # [S, K/S, d] float32, unit rows
    ids: jnp.ndarray  # [S, K/S] int32 modality ids, -1 for initial rows
    ptr: jnp.ndarray  # [S] int32 next write row within each shard

    @property
    def num_shards(self) -> int:
        return self.queue.shape[0]

    @property
    def size(self) -> int:
        return self.queue.shape[0] * self.queue.shape[1]


def check_memory_config(size: int, num_shards: int, partition_size: int, global_batch: int) -> None:
    """Raises a ValueError naming the config key when the memory layout cannot work."""
    if size % num_shards:
        raise ValueError(f"memory.size={size} is not divisible by memory.num_shards={num_shards}")
    if global_batch % num_shards:
        raise ValueError(f"global_batch={global_batch} is not divisible by memory.num_shards={num_shards}")
    if size % global_batch:
        raise ValueError(f"memory.size={size} is not divisible by global_batch={global_batch}")
    if size % partition_size:
        raise ValueError(f"memory.size={size} is not divisible by memory.partition_size={partition_size}")
    if partition_size % num_shards:
        raise ValueError(
            f"memory.partition_size={partition_size} is not divisible by memory.num_shards={num_shards}"
        )


def init_memory(rng: jax.Array, size: int, dim: int, num_shards: int) -> MemoryState:
    queue = jax.random.normal(rng, (num_shards, size // num_shards, dim), jnp.float32)
    queue = queue / jnp.linalg.norm(queue, axis=-1, keepdims=True)
    return MemoryState(
        queue=queue,
        ids=jnp.full((num_shards, size // num_shards), EMPTY_MODALITY_ID, jnp.int32),
        ptr=jnp.zeros((num_shards,), jnp.int32),
    )


def _enqueue_shards(queue: jnp.ndarray, ids: jnp.ndarray, ptr: jnp.ndarray, embeddings: jnp.ndarray,
                    modality: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Writes rows into the shards given (all of them, or one device's), each at its pointer."""
    num_shards, rows_per_shard, dim = queue.shape
    per_shard = embeddings.shape[0] // num_shards
    new_rows = embeddings.reshape(num_shards, per_shard, dim).astype(queue.dtype)
    new_ids = modality.reshape(num_shards, per_shard).astype(jnp.int32)

    def write(shard_queue, shard_ids, shard_ptr, rows, row_ids):
        shard_queue = jax.lax.dynamic_update_slice(shard_queue, rows, (shard_ptr, 0))
        shard_ids = jax.lax.dynamic_update_slice(shard_ids, row_ids, (shard_ptr,))
        return shard_queue, shard_ids, (shard_ptr + per_shard) % rows_per_shard

    return jax.vmap(write)(queue, ids, ptr, new_rows, new_ids)


def enqueue(memory: MemoryState, embeddings: jnp.ndarray, modality: jnp.ndarray,
            mesh: Mesh | None = None) -> MemoryState:
    """Writes B new rows: shard s gets batch rows [s*B/S, (s+1)*B/S) at its own pointer.

    Configuration guarantees that K/S is a multiple of B/S, so a write never straddles the end of
    a shard and the pointer wraps exactly to 0. With `mesh`, each device writes its own shards
    from its own batch rows (see the module docstring): no collective.
    """
    args = (memory.queue, memory.ids, memory.ptr, embeddings, modality)
    if mesh is None:
        queue, ids, ptr = _enqueue_shards(*args)
    else:
        spec = PartitionSpec(BATCH_AXES)
        queue, ids, ptr = jax.shard_map(_enqueue_shards, mesh=mesh, in_specs=spec, out_specs=spec)(*args)
    return MemoryState(queue=queue, ids=ids, ptr=ptr)


def is_full(memory: MemoryState) -> jnp.ndarray:
    """True once every initial row has been overwritten; modality gating starts then."""
    return jnp.all(memory.ids != EMPTY_MODALITY_ID)


def fill_fractions(memory: MemoryState) -> jnp.ndarray:
    """Fraction of the memory held by each modality, [NUM_MODALITIES + 1], the last being empty rows."""
    ids = memory.ids.reshape(-1)
    counts = jnp.stack([jnp.sum(ids == m) for m in range(NUM_MODALITIES)] + [jnp.sum(ids == EMPTY_MODALITY_ID)])
    return counts.astype(jnp.float32) / ids.size


def _partition_shards(rng: jax.Array, first_shard: jnp.ndarray, num_shards: int, rows_per_shard: int,
                      num_blocks: int) -> jnp.ndarray:
    """Flat columns [num_blocks, num_shards * per_shard] of shards first_shard, first_shard + 1, ..."""
    shard_ids = first_shard + jnp.arange(num_shards)
    perms = jax.vmap(lambda s: jax.random.permutation(jax.random.fold_in(rng, s), rows_per_shard))(shard_ids)
    local = perms.reshape(num_shards, num_blocks, rows_per_shard // num_blocks)
    flat = local + (shard_ids * rows_per_shard)[:, None, None]
    return flat.transpose(1, 0, 2).reshape(num_blocks, -1).astype(jnp.int32)


def stratified_partition(rng: jax.Array, memory: MemoryState, partition_size: int,
                         mesh: Mesh | None = None) -> jnp.ndarray:
    """A random partition of the K memory columns into K/partition_size blocks.

    Returns flat column indices [num_blocks, partition_size] into the queue viewed as [K, d]. Each
    block takes partition_size/S random columns from every logical shard, in shard order, and
    shard s's permutation comes from fold_in(rng, s): the partition depends on S, never on the
    device count. With `mesh` the result is split over the batch devices along its columns, each
    device drawing the columns of its own shards (the layout memory_cross_entropy consumes).
    """
    num_shards, rows_per_shard, _ = memory.queue.shape
    num_blocks = memory.size // partition_size
    if mesh is None:
        return _partition_shards(rng, jnp.int32(0), num_shards, rows_per_shard, num_blocks)
    local_shards = num_shards // num_batch_shards(mesh)

    def local(key):
        first = jax.lax.axis_index(BATCH_AXES) * local_shards
        return _partition_shards(key, first, local_shards, rows_per_shard, num_blocks)

    return jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(),
                         out_specs=PartitionSpec(None, BATCH_AXES))(rng)
