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
