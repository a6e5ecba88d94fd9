"""The memory queue: FIFO order with wrap-around per logical shard, ids, partitions, config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mermed_jax.ssl import memory as memory_lib


class ReferenceQueue:
    """A plain list-of-shards FIFO, as the design describes it."""

    def __init__(self, size, shards, dim):
        self.rows = [np.full((size // shards, dim), np.nan) for _ in range(shards)]
        self.ids = [np.full(size // shards, -1) for _ in range(shards)]
        self.ptr = [0] * shards

    def push(self, emb, ids):
        shards = len(self.rows)
        per = len(emb) // shards
        for s in range(shards):
            for r in range(per):
                self.rows[s][self.ptr[s]] = emb[s * per + r]
                self.ids[s][self.ptr[s]] = ids[s * per + r]
                self.ptr[s] = (self.ptr[s] + 1) % len(self.ids[s])


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_fifo_wraps_around_per_shard(shards):
    size, batch, dim = 24, 8, 3
    memory = memory_lib.init_memory(jax.random.key(0), size, dim, shards)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(memory.queue), axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(memory.ids) == -1)
    ref = ReferenceQueue(size, shards, dim)
    rng = np.random.default_rng(0)
    for step in range(7):  # 56 rows through a 24-row queue: wraps twice
        emb = rng.normal(size=(batch, dim)).astype(np.float32)
        ids = rng.integers(0, 7, batch)
        memory = jax.jit(memory_lib.enqueue)(memory, jnp.asarray(emb), jnp.asarray(ids))
        ref.push(emb, ids)
        filled = ~np.isnan(np.stack(ref.rows))
        np.testing.assert_array_equal(np.asarray(memory.queue)[filled], np.stack(ref.rows)[filled])
        np.testing.assert_array_equal(np.asarray(memory.ids), np.stack(ref.ids))
        np.testing.assert_array_equal(np.asarray(memory.ptr), ref.ptr)
        assert bool(memory_lib.is_full(memory)) == (step >= 2)


def test_fill_fractions_count_modalities_and_empty_rows():
    memory = memory_lib.init_memory(jax.random.key(0), 16, 2, 2)
    memory = memory_lib.enqueue(memory, jnp.ones((4, 2)), jnp.asarray([0, 0, 6, 3]))
    fill = np.asarray(memory_lib.fill_fractions(memory))
    assert fill[0] == 2 / 16 and fill[3] == 1 / 16 and fill[6] == 1 / 16 and fill[-1] == 12 / 16
    assert fill.sum() == pytest.approx(1.0)


def test_partition_is_stratified_and_covers_every_column_once():
    size, shards, part = 64, 4, 16
    memory = memory_lib.init_memory(jax.random.key(0), size, 2, shards)
    partition = np.asarray(memory_lib.stratified_partition(jax.random.key(5), memory, part))
    assert partition.shape == (size // part, part)
    np.testing.assert_array_equal(np.sort(partition.reshape(-1)), np.arange(size))
    shard_of = partition // (size // shards)
    for block in shard_of:
        np.testing.assert_array_equal(np.bincount(block, minlength=shards), part // shards)
    other = np.asarray(memory_lib.stratified_partition(jax.random.key(6), memory, part))
    assert not np.array_equal(partition, other)


def test_stratified_partition_differs_from_the_official_uniform_one_only_in_co_membership():
    """memory.py keeps the stratified scheme (a deliberate difference from the official uniform
    permutation): every column is in every block equally often, as with a uniform partition; only
    which columns share a block changes (same shard: (P/S - 1) / (K/S - 1), else P/K; uniform:
    (P - 1) / (K - 1) for any pair). bench/partition_schemes.py measures the effect on the loss."""
    size, shards, part, draws = 64, 4, 16, 4000
    blocks, per_shard = size // part, size // shards
    memory = memory_lib.init_memory(jax.random.key(0), size, 2, shards)
    keys = jax.random.split(jax.random.key(11), draws)
    partitions = np.asarray(jax.vmap(lambda k: memory_lib.stratified_partition(k, memory, part))(keys))
    block_of = np.empty((draws, size), np.int64)
    for b in range(blocks):
        np.put_along_axis(block_of, partitions[:, b], b, axis=1)
    tol = 4 * np.sqrt(0.25 * 0.75 / draws)
    for b in range(blocks):  # P(column c in block b) = 1 / blocks for every c
        np.testing.assert_allclose(np.mean(block_of == b, axis=0), 1 / blocks, atol=tol)
    same = np.mean(block_of[:, 0] == block_of[:, 1])  # columns 0 and 1: shard 0 both
    other = np.mean(block_of[:, 0] == block_of[:, per_shard])  # shard 0 and shard 1
    assert abs(same - (part // shards - 1) / (per_shard - 1)) < tol
    assert abs(other - part / size) < tol
    assert abs(same - (part - 1) / (size - 1)) > tol  # the uniform value: distinguishable here


@pytest.mark.parametrize(
    "size,shards,part,batch,key",
    [
        (100, 8, 16, 32, "memory.size=100 is not divisible by memory.num_shards"),
        (1024, 8, 256, 12, "global_batch=12 is not divisible by memory.num_shards"),
        (1000, 8, 8, 16, "memory.size=1000 is not divisible by global_batch"),
        (1024, 8, 384, 32, "memory.partition_size=384"),
        (1024, 8, 4, 32, "memory.partition_size=4 is not divisible by memory.num_shards"),
    ],
)
def test_bad_memory_config_names_the_key(size, shards, part, batch, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        memory_lib.check_memory_config(size, shards, part, batch)
