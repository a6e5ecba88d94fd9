"""Memory partition schemes on a simulated mesh: ours (stratified) against the official (uniform).

The official RandomPartition draws a uniform random permutation of the K memory columns
(torch.multinomial without replacement) and cuts it into K/P blocks of P. Ours
(memory.stratified_partition) makes every block take P/S random columns of each of the S logical
shards, so on a mesh of N batch devices each device owns exactly P/N columns of every block and the
sharded loss all-gathers one block's keys at a time (memory_loss.py). A uniform block has a random
number of columns on each device, so no fixed-shape per-block gather exists; the two ways to run it
sharded that keep shapes static, both implemented here (not in the library):

  uniform_gather     all-gather the whole queue and its ids once per step, then the library's
                     block arithmetic on the replicated queue for each device's own rows;
  uniform_allreduce  per block, each device writes its own columns into a zero [P, d] buffer
                     (and the ids into a [P] one) and the buffers are psum'd: no replicated queue,
                     but an all-reduce of P x (d + 1) words per block (twice: the rematerialised
                     backward pass repeats it).

Measured per scheme, on the same inputs: the time of one jitted value_and_grad of the memory loss
w.r.t. the student embeddings, partition drawing included (median and min of --repeats rounds, the
schemes interleaved so that load from other processes falls on all alike); the collective bytes of
the compiled program (training/hlo_stats.py: operand bytes per device, loops counted) and from them
the bytes each device receives (all-gather: (N - 1) x operand; ring all-reduce: 2 (N - 1) / N x
operand); XLA's temp-buffer size; the gradient against the unsharded library's; the loss over
--seeds partition seeds (the uniform schemes against the unsharded library loss on the same
uniform partition, as the correctness check); and the mean |stratified - uniform| loss over
seeds, with the difference of the two means and its standard error, to see whether the
expectations agree. Inputs: a full memory (gating on, the steady state) filled by enqueueing
batches of modality-clustered unit embeddings, crops that are noisy copies of their image's
embedding, and the initial random memory (gating off). uniform_allreduce's block computes only the
cross-entropy (the library's also sums the two entropies it logs). One JSON line at the end.

Usage:
  .venv/bin/python bench/partition_schemes.py   # 8 simulated CPU devices, K 16384, P 2048, B 64, d 256
  .venv/bin/python bench/partition_schemes.py --size 4096 --partition 512 --dim 64 --seeds 4  # quick
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import json
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax import sharding
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.memory_loss import (
    _block_sums,
    _masked_log_softmax,
    memory_cross_entropy,
)
from mermed_jax.training import hlo_stats

AXES = sharding.BATCH_AXES


def uniform_partition(rng: jax.Array, size: int, partition_size: int) -> jnp.ndarray:
    """The official scheme: a uniform random permutation of the K columns, cut into blocks."""
    return jax.random.permutation(rng, size).reshape(size // partition_size, partition_size).astype(jnp.int32)


def _loss_from_sums(totals, n_student, n_teacher, batch, num_blocks):
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    return totals[0] / (num_blocks * batch * n_pairs)


def uniform_gather_loss(student, teacher, memory, modality, partition, *, student_temp, teacher_temp,
                        gating, mesh):
    """Uniform partition, sharded: all-gather the queue once, then the library's block arithmetic."""
    n_student, batch, dim = student.shape

    def local(student, teacher, queue, ids, modality, partition, gating):
        full_queue = jax.lax.all_gather(queue, AXES, axis=0, tiled=True).reshape(-1, dim)
        full_ids = jax.lax.all_gather(ids, AXES, axis=0, tiled=True).reshape(-1)
        totals = _block_sums(student, jax.lax.stop_gradient(teacher), jax.lax.stop_gradient(full_queue), full_ids,
                             modality, partition, jnp.float32(student_temp), jnp.float32(teacher_temp), gating, ())
        return jax.lax.psum(totals, AXES)

    rows, shards, repl = PartitionSpec(None, AXES), PartitionSpec(AXES), PartitionSpec()
    totals = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, shards, shards, shards, repl, repl),
                           out_specs=repl, check_vma=False)(
        student, teacher, memory.queue, memory.ids, modality, partition, gating)
    return _loss_from_sums(totals, n_student, teacher.shape[0], batch, partition.shape[0])


def uniform_allreduce_loss(student, teacher, memory, modality, partition, *, student_temp, teacher_temp,
                           gating, mesh):
    """Uniform partition, sharded without a replicated queue: per block, psum of each device's columns."""
    n_student, batch, dim = student.shape
    n_teacher = teacher.shape[0]

    def local(student, teacher, queue, ids, modality, partition, gating):
        queue, ids = queue.reshape(-1, dim), ids.reshape(-1)
        first = jax.lax.axis_index(AXES) * queue.shape[0]
        pair_mask = (jnp.arange(n_student)[:, None] != jnp.arange(n_teacher)[None, :]).astype(jnp.float32)
        teacher = jax.lax.stop_gradient(teacher)

        def block(total, columns):
            local_cols = columns - first
            mine = (local_cols >= 0) & (local_cols < queue.shape[0])
            safe = jnp.clip(local_cols, 0, queue.shape[0] - 1)
            keys = jax.lax.psum(jnp.where(mine[:, None], jax.lax.stop_gradient(queue)[safe], 0.0), AXES)
            key_ids = jax.lax.psum(jnp.where(mine, ids[safe], 0), AXES)
            mask = jnp.logical_or(~gating, key_ids[None, :] == modality[:, None])
            valid_row = jnp.any(mask, axis=-1)
            s_logp = _masked_log_softmax(jnp.einsum("nbd,pd->nbp", student, keys) / student_temp, mask)
            t_prob = jnp.exp(_masked_log_softmax(jnp.einsum("nbd,pd->nbp", teacher, keys) / teacher_temp, mask))
            cross = -jnp.einsum("jbp,ibp->ijb", t_prob, jnp.where(mask, s_logp, 0.0))
            cross = jnp.where(valid_row, cross, 0.0)
            return total + jnp.sum(cross * pair_mask[:, :, None]), None

        total, _ = jax.lax.scan(jax.checkpoint(block), jnp.float32(0.0), partition)
        return jax.lax.psum(total, AXES)

    rows, shards, repl = PartitionSpec(None, AXES), PartitionSpec(AXES), PartitionSpec()
    total = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, shards, shards, shards, repl, repl),
                          out_specs=repl, check_vma=False)(
        student, teacher, memory.queue, memory.ids, modality, partition, gating)
    return _loss_from_sums(jnp.stack([total]), n_student, n_teacher, batch, partition.shape[0])


def make_inputs(args, mesh, full: bool):
    """Student/teacher unit embeddings clustered by modality; a full (gated) or initial memory."""
    rng = np.random.default_rng(0)
    m = NUM_MODALITIES
    centres = rng.normal(size=(m, args.dim))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)

    def embed(modality, n=1):
        x = centres[modality] + args.spread * rng.normal(size=(n, len(modality), args.dim)) / np.sqrt(args.dim)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    modality = np.arange(args.batch) % m  # balanced, as every device batch of the sampler is
    memory = memory_lib.init_memory(jax.random.key(0), args.size, args.dim, args.shards)
    if full:
        enqueue = jax.jit(memory_lib.enqueue)
        for t in range(args.size // args.batch):
            step_modality = np.roll(modality, t)
            memory = enqueue(memory, jnp.asarray(embed(step_modality)[0]), jnp.asarray(step_modality, jnp.int32))
        assert bool(memory_lib.is_full(memory))
    # Each row is an image (a point near its modality's centre); its crops are noisy copies of it.
    image = embed(modality)[0]
    crops = image[None] + args.crop_noise * rng.normal(size=(args.student_crops, args.batch, args.dim)) / np.sqrt(args.dim)
    crops = (crops / np.linalg.norm(crops, axis=-1, keepdims=True)).astype(np.float32)
    on_rows = NamedSharding(mesh, PartitionSpec(None, AXES))
    on_shards = NamedSharding(mesh, PartitionSpec(AXES))
    return (jax.device_put(crops, on_rows), jax.device_put(crops[:args.teacher_crops], on_rows),
            jax.device_put(memory, on_shards), jax.device_put(jnp.asarray(modality, jnp.int32), on_shards))


def scheme_fns(args, mesh, teacher, memory, modality):
    kw = {"student_temp": 0.1, "teacher_temp": 0.07}
    gating = memory_lib.is_full(memory)

    def stratified(student, rng):
        partition = memory_lib.stratified_partition(rng, memory, args.partition, mesh)
        return memory_cross_entropy(student, teacher, memory, modality, partition, gating=gating, mesh=mesh,
                                    **kw)["loss"]

    def uniform_gather(student, rng):
        partition = uniform_partition(rng, args.size, args.partition)
        return uniform_gather_loss(student, teacher, memory, modality, partition, gating=gating, mesh=mesh, **kw)

    def uniform_allreduce(student, rng):
        partition = uniform_partition(rng, args.size, args.partition)
        return uniform_allreduce_loss(student, teacher, memory, modality, partition, gating=gating, mesh=mesh,
                                      **kw)

    def uniform_unsharded(student, rng):  # the reference for the sharded uniform schemes
        partition = uniform_partition(rng, args.size, args.partition)
        return memory_cross_entropy(student, teacher, memory, modality, partition, gating=gating, **kw)["loss"]

    return {"stratified": stratified, "uniform_gather": uniform_gather, "uniform_allreduce": uniform_allreduce,
            "uniform_unsharded": uniform_unsharded}


def measure(args, mesh, full: bool) -> dict:
    student, teacher, memory, modality = make_inputs(args, mesh, full)
    fns = scheme_fns(args, mesh, teacher, memory, modality)
    out: dict = {"gating": bool(memory_lib.is_full(memory))}
    losses, compiled = {}, {}
    for name, fn in fns.items():
        compiled[name] = jax.jit(jax.value_and_grad(fn)).lower(student, jax.random.key(0)).compile()
        entry: dict = {}
        if name != "uniform_unsharded":
            moved = hlo_stats.collective_bytes(compiled[name].as_text())
            entry["collective_bytes"] = {k: v for k, v in moved.items() if v}
            n = mesh.devices.size  # received per device: all-gather (n-1) x operand, ring all-reduce 2 (n-1)/n x
            entry["received_bytes_per_device"] = int(moved["all-gather"] * (n - 1) + 2 * moved["all-reduce"] * (n - 1) / n)
            mem = compiled[name].memory_analysis()
            if mem is not None:
                entry["temp_bytes"] = int(mem.temp_size_in_bytes)
        loss_only = jax.jit(fn)
        losses[name] = np.asarray([float(loss_only(student, jax.random.key(1000 + s))) for s in range(args.seeds)])
        entry["loss_mean"] = float(losses[name].mean())
        entry["loss_std_over_seeds"] = float(losses[name].std(ddof=1))
        out[name] = entry
    # Timing: the sharded schemes in turn, round after round, so that load from other processes
    # on a shared machine falls on all of them alike; median and min over rounds.
    timed = [name for name in fns if name != "uniform_unsharded"]
    times: dict = {name: [] for name in timed}
    for name in timed:
        jax.block_until_ready(compiled[name](student, jax.random.key(0)))
    for r in range(args.repeats):
        for name in timed:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](student, jax.random.key(r)))
            times[name].append(time.perf_counter() - t0)
    for name in timed:
        out[name]["step_ms_median"] = round(1e3 * float(np.median(times[name])), 2)
        out[name]["step_ms_min"] = round(1e3 * float(np.min(times[name])), 2)
    reference = jax.jit(jax.value_and_grad(fns["uniform_unsharded"]))(student, jax.random.key(7))
    for name in ("uniform_gather", "uniform_allreduce"):
        out[name]["max_abs_vs_unsharded"] = float(np.max(np.abs(losses[name] - losses["uniform_unsharded"])))
        _, grad = jax.jit(jax.value_and_grad(fns[name]))(student, jax.random.key(7))
        out[name]["grad_max_rel_vs_unsharded"] = float(
            np.max(np.abs(np.asarray(grad) - np.asarray(reference[1]))) / np.max(np.abs(np.asarray(reference[1]))))
    diff = losses["stratified"] - losses["uniform_gather"]
    se = float(np.sqrt(losses["stratified"].var(ddof=1) / args.seeds + losses["uniform_gather"].var(ddof=1) / args.seeds))
    out["stratified_vs_uniform"] = {
        "mean_abs_diff": float(np.mean(np.abs(diff))),
        "mean_abs_diff_rel": float(np.mean(np.abs(diff)) / abs(losses["uniform_gather"].mean())),
        "diff_of_means": float(diff.mean()),
        "diff_of_means_se": se,
        "diff_of_means_in_se": float(diff.mean() / se) if se > 0 else 0.0,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--partition", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--student-crops", type=int, default=12)
    parser.add_argument("--teacher-crops", type=int, default=2)
    parser.add_argument("--spread", type=float, default=1.5, help="noise around each modality's centre")
    parser.add_argument("--crop-noise", type=float, default=0.5, help="noise of a crop around its image")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    devices = jax.devices()
    mesh = sharding.make_mesh((len(devices), 1, 1))
    memory_lib.check_memory_config(args.size, args.shards, args.partition, args.batch)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "bench": "partition_schemes",
        "devices": len(devices), "platform": devices[0].platform, "cpu": model or platform.processor(),
        "cores": os.cpu_count(), "jax": jax.__version__,
        "size": args.size, "partition": args.partition, "batch": args.batch, "dim": args.dim,
        "shards": args.shards, "student_crops": args.student_crops, "teacher_crops": args.teacher_crops,
        "seeds": args.seeds, "repeats": args.repeats,
        "full_memory": measure(args, mesh, full=True),
        "initial_memory": measure(args, mesh, full=False),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
