"""The FIFO memory of teacher embeddings, as functional state laid out in logical shards.

The queue holds K rows as [S, K/S, d]: S logical shards of K/S rows, each with its own pointer.
Every step each logical shard receives B/S of the B new embeddings (batch rows are assigned to
shards contiguously, so when the batch and the shard axis are split over the same devices, each
device writes only its own shards). Nothing here depends on the number of devices: two runs with
the same S produce the same queue on any mesh, which is what makes checkpoints portable across
meshes. Shards start as random unit vectors with modality id -1, like the official code; those
rows take part in the logits until overwritten.
"""

import flax.struct
import jax
import jax.numpy as jnp

from mermed_jax.modalities import EMPTY_MODALITY_ID, NUM_MODALITIES


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


def enqueue(memory: MemoryState, embeddings: jnp.ndarray, modality: jnp.ndarray) -> MemoryState:
    """Writes B new rows: shard s gets batch rows [s*B/S, (s+1)*B/S) at its own pointer.

    Configuration guarantees that K/S is a multiple of B/S, so a write never straddles the end of
    a shard and the pointer wraps exactly to 0.
    """
    num_shards, rows_per_shard, dim = memory.queue.shape
    per_shard = embeddings.shape[0] // num_shards
    new_rows = embeddings.reshape(num_shards, per_shard, dim).astype(memory.queue.dtype)
    new_ids = modality.reshape(num_shards, per_shard).astype(jnp.int32)

    def write(shard_queue, shard_ids, ptr, rows, ids):
        shard_queue = jax.lax.dynamic_update_slice(shard_queue, rows, (ptr, 0))
        shard_ids = jax.lax.dynamic_update_slice(shard_ids, ids, (ptr,))
        return shard_queue, shard_ids, (ptr + per_shard) % rows_per_shard

    queue, ids, ptr = jax.vmap(write)(memory.queue, memory.ids, memory.ptr, new_rows, new_ids)
    return MemoryState(queue=queue, ids=ids, ptr=ptr)


def is_full(memory: MemoryState) -> jnp.ndarray:
    """True once every initial row has been overwritten; modality gating starts then."""
    return jnp.all(memory.ids != EMPTY_MODALITY_ID)


def fill_fractions(memory: MemoryState) -> jnp.ndarray:
    """Fraction of the memory held by each modality, [NUM_MODALITIES + 1], the last being empty rows."""
    ids = memory.ids.reshape(-1)
    counts = jnp.stack([jnp.sum(ids == m) for m in range(NUM_MODALITIES)] + [jnp.sum(ids == EMPTY_MODALITY_ID)])
    return counts.astype(jnp.float32) / ids.size


def stratified_partition(rng: jax.Array, memory: MemoryState, partition_size: int) -> jnp.ndarray:
    """A random partition of the K memory columns into K/partition_size blocks.

    Returns flat column indices [num_blocks, partition_size] into the queue viewed as [K, d]. Each
    block takes partition_size/S random columns from every logical shard, and shard s's
    permutation comes from fold_in(rng, s): the partition depends on S, never on the device count.
    """
    num_shards, rows_per_shard, _ = memory.queue.shape
    num_blocks = memory.size // partition_size
    per_shard = partition_size // num_shards
    keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(jnp.arange(num_shards))
    perms = jax.vmap(lambda k: jax.random.permutation(k, rows_per_shard))(keys)  # [S, K/S]
    local = perms.reshape(num_shards, num_blocks, per_shard)
    flat = local + (jnp.arange(num_shards) * rows_per_shard)[:, None, None]
    return flat.transpose(1, 0, 2).reshape(num_blocks, partition_size).astype(jnp.int32)
