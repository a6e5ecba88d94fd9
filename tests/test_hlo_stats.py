"""Collective bytes from compiled HLO: operand sizes times the trip counts of the loops around them."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mermed_jax.training import hlo_stats


def _compiled(fn, x, mesh):
    spec = PartitionSpec("i")
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
    return mapped.lower(jax.device_put(x, NamedSharding(mesh, spec))).compile().as_text()


def test_counts_collectives_inside_nested_loops():
    mesh = jax.make_mesh((8,), ("i",))

    def fn(x):  # [1, 100] per device
        def inner(c, _):
            return c + jax.lax.psum(c, "i"), None

        def outer(c, _):
            c = jax.lax.scan(inner, c, None, length=3)[0]
            return c + jax.lax.all_gather(c, "i", tiled=True).sum(0, keepdims=True), None

        return jax.lax.scan(outer, x, None, length=5)[0]

    got = hlo_stats.collective_bytes(_compiled(fn, jnp.ones((8, 100)), mesh))
    assert got["all-reduce"] == 5 * 3 * 400
    assert got["all-gather"] == 5 * 400
    assert got["reduce-scatter"] == got["all-to-all"] == got["collective-permute"] == 0


def test_collectives_over_one_device_are_not_counted():
    mesh = jax.make_mesh((1,), ("i",))
    got = hlo_stats.collective_bytes(_compiled(lambda x: x + jax.lax.psum(x, "i"), jnp.ones((1, 100)), mesh))
    assert sum(got.values()) == 0
