"""Speed of the full MerMED-FM train step: images/s, MFU against a matmul peak measured in the same
run, FLOPs cross-checked with XLA, and a per-part breakdown (issue 7).

What is timed: `train_step.make_train_step` jitted with `jit_train_step` on a one-axis data mesh over
all local devices, on synthetic uint8 crops (2 x 224 + 10 x 96 by default, the paper's), a memory
whose ids are all set (so modality gating is active, the steady state), schedule values of a
mid-training step. Inputs are placed on device before timing: this measures the step, not the
loader (bench/input_pipeline.py measures that).

Numbers reported:
  * images/s: global batch / median seconds per step (each step blocked on its result).
  * FLOPs per step: the analytic model count of mermed_jax.training.flops.step_flops (matmuls only,
    student x3 for forward+backward, no remat), next to XLA's cost_analysis() of the compiled step
    (which also counts elementwise work and any recomputation) and their ratio.
  * MFU = analytic FLOPs / s / (devices x peak), where the peak is the best rate of a square matmul
    jitted here, in this process, in the policy's matmul operand dtype (and, for reference, the
    other dtype too).
    `--best-peak-gflops` adds MFU against a peak measured elsewhere (e.g. torch's oneDNN bf16).
  * parts: separately jitted pieces, each timed alone (their sum differs from the fused step):
      student_fwd_bwd  value_and_grad of the student network on all crops (a dummy linear loss)
      teacher_fwd      teacher network on the global crops, BatchNorm in training mode
      memory_loss      memory_cross_entropy forward + gradient w.r.t. the student embeddings
      optimizer        the AdamW/layer-decay/clip update + apply
      ema              ema_update of all parameters
  * peak memory: device memory_stats()['peak_bytes_in_use'] where the backend has it (GPU/TPU),
    else XLA's memory analysis of the compiled step and the process's max RSS.

Imports: jax, flax, optax and ml_collections only; neither clu nor tensorflow (their writers live
in mermed_jax/training/metric_writers.py), checked at the end (`import_check` in the output).

Usage:
  .venv/bin/python bench/train_step.py --variant S/16 --batch 8 --precision mixed
  .venv/bin/python bench/train_step.py --variant B/16 --batch 4 --steps 3 --parts
  (GPU: bench/gpu.sh)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax import sharding
from mermed_jax.models import networks
from mermed_jax.models.precision import PRECISIONS, policy
from mermed_jax.recipe import arguments
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.ema import ema_update
from mermed_jax.ssl.memory_loss import memory_cross_entropy
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import flops, train_state, train_step


def _time(fn, *args, steps: int, warmup: int = 1) -> list[float]:
    """Seconds per call, each call blocked on its outputs; compile excluded (warm-up calls)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype: str, n: int, reps: int = 5, chain: int = 4) -> float:
    """Best FLOP/s of `chain` dependent n x n matmuls in one jitted call, per device (device 0)."""
    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / np.sqrt(n)).astype(dt)

    @jax.jit
    def f(a, b):
        for _ in range(chain):
            a = a @ b
        return a

    best = min(_time(f, a, b, steps=reps, warmup=2))
    return chain * 2 * n**3 / best


# The paper's config (its corpus size sets the schedules' length), with this benchmark's shapes.
PAPER_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mermed_vitb16.py"


def build(args):
    config = arguments.load_config_file(PAPER_CONFIG, args.config_args)
    config.model.variant = args.variant
    config.precision = args.precision
    config.model.remat_policy = args.remat
    config.global_batch = args.batch * jax.device_count()
    config.crops.num_global, config.crops.num_local = args.num_global, args.num_local
    config.crops.global_size, config.crops.local_size = args.global_size, args.local_size
    if args.memory:
        config.memory.size = args.memory
        config.memory.partition_size = min(config.memory.partition_size, args.memory)
    memory_lib.check_memory_config(config.memory.size, config.memory.num_shards,
                                   config.memory.partition_size, config.global_batch)
    return config


def full_memory(state):
    """All ids set (gating on), as after the first K / B steps of training."""
    ids = state.memory.ids
    full = (jnp.arange(ids.size, dtype=jnp.int32) % NUM_MODALITIES).reshape(ids.shape)
    full = jax.device_put(full, ids.sharding)
    return state.replace(memory=state.memory.replace(ids=full))


PIXEL_MEAN = np.full((NUM_MODALITIES, 3), 0.45, np.float32)
PIXEL_STD = np.full((NUM_MODALITIES, 3), 0.25, np.float32)


class CompiledStep(NamedTuple):
    """The compiled step and its inputs, ready to call as compiled(state, batch, rng, hparams)."""

    compiled: Any
    state: Any
    batch: dict[str, jax.Array]
    rng: jax.Array
    hparams: dict[str, jax.Array]


def compile_step(config) -> CompiledStep:
    """The full train step on a data mesh over all local devices, compiled for synthetic inputs,
    a full memory and mid-training schedule values (see the module docstring)."""
    mesh = sharding.make_mesh((-1, 1, 1))
    with sharding.axis_rules_context(mesh):
        state, shardings = sharding.create_sharded(
            lambda: train_state.init_train_state(config, jax.random.key(config.seed)), mesh)
    state = full_memory(state)
    step = train_step.make_train_step(config, PIXEL_MEAN, PIXEL_STD, mesh=mesh)
    jitted = train_step.jit_train_step(step, mesh, shardings)
    batch = sharding.to_global(train_step.random_batch(config, np.random.default_rng(0)), sharding.batch_sharding(mesh))
    schedules = build_schedules(config)
    hparams = {k: jnp.asarray(v) for k, v in schedules.at(len(schedules) // 2).items()}
    rng = jax.random.key(1)
    return CompiledStep(jitted.lower(state, batch, rng, hparams).compile(), state, batch, rng, hparams)


def time_parts(config, state, batch, hparams, pixel_mean, pixel_std, steps: int) -> dict[str, float]:
    """Median seconds of each part, jitted separately (see module docstring)."""
    student_net, teacher_net = networks.build_networks(config)
    optimizer = train_state.make_student_optimizer(config)
    mean, std = jnp.asarray(pixel_mean), jnp.asarray(pixel_std)
    modality = batch["modality"]
    c = config.crops

    def crops_of(batch):
        out = [train_step.normalize_crops(batch["global"], modality, mean, std)]
        if c.num_local:
            out.append(train_step.normalize_crops(batch["local"], modality, mean, std))
        return out

    @jax.jit
    def student_fwd_bwd(params, batch_stats, batch):
        def loss(p):
            emb, _ = student_net.apply({"params": p, "batch_stats": batch_stats}, crops_of(batch), train=True,
                                       rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
            return jnp.sum(emb * 1e-3)
        return jax.value_and_grad(loss)(params)

    @jax.jit
    def teacher_fwd(params, batch_stats, batch):
        emb, _ = teacher_net.apply({"params": params, "batch_stats": batch_stats}, crops_of(batch)[:1],
                                   train=True, mutable=["batch_stats"])
        return emb

    n_student = c.num_global + c.num_local
    d = config.head.bottleneck_dim
    key_s, key_t, key_p = jax.random.split(jax.random.key(2), 3)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    student_emb = unit(jax.random.normal(key_s, (n_student, config.global_batch, d)))
    teacher_emb = unit(jax.random.normal(key_t, (c.num_global, config.global_batch, d)))
    partition = jax.jit(lambda k, m: memory_lib.stratified_partition(k, m, config.memory.partition_size))(
        key_p, state.memory)

    @jax.jit
    def memory_loss(student, teacher, memory, partition, teacher_temp):
        def loss(s):
            return memory_cross_entropy(s, teacher, memory, modality, partition,
                                        student_temp=config.loss.student_temp, teacher_temp=teacher_temp,
                                        gating=memory_lib.is_full(memory), precision=config.precision)["loss"]
        return jax.value_and_grad(loss)(student)

    @jax.jit
    def opt_update(grads, opt_state, params, lr, wd):
        updates, new_opt_state = optimizer.update(grads, opt_state, params, learning_rate=lr, weight_decay=wd)
        return jax.tree.map(jnp.add, params, updates), new_opt_state

    ema = jax.jit(ema_update)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-4), state.params)
    med = lambda ts: float(np.median(ts))  # noqa: E731
    return {
        "student_fwd_bwd": med(_time(student_fwd_bwd, state.params, state.batch_stats, batch, steps=steps)),
        "teacher_fwd": med(_time(teacher_fwd, state.teacher_params, state.teacher_batch_stats, batch, steps=steps)),
        "memory_loss": med(_time(memory_loss, student_emb, teacher_emb, state.memory, partition,
                                 hparams["teacher_temp"], steps=steps)),
        "optimizer": med(_time(opt_update, grads, state.opt_state, state.params, hparams["learning_rate"],
                               hparams["weight_decay"], steps=steps)),
        "ema": med(_time(ema, state.teacher_params, state.params, hparams["momentum"], steps=steps)),
    }


def _peak_memory(compiled) -> dict[str, float]:
    out = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    try:
        ma = compiled.memory_analysis()
        out["xla_temp_gib"] = ma.temp_size_in_bytes / 2**30
        out["xla_args_gib"] = ma.argument_size_in_bytes / 2**30
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    out["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def check_loss(path: str) -> dict:
    """Our memory loss on the PyTorch reference's inputs (fp32 here, fp64 there)."""
    z = np.load(path)
    k, d = z["queue"].shape
    memory = memory_lib.MemoryState(queue=jnp.asarray(z["queue"]).reshape(1, k, d),
                                    ids=jnp.asarray(z["ids"], jnp.int32).reshape(1, k), ptr=jnp.zeros((1,), jnp.int32))
    out = {}
    for gating in (True, False):
        ours = float(memory_cross_entropy(jnp.asarray(z["student"]), jnp.asarray(z["teacher"]), memory,
                                          jnp.asarray(z["modality"], jnp.int32), jnp.asarray(z["partition"], jnp.int32),
                                          student_temp=0.1, teacher_temp=0.07, gating=jnp.asarray(gating))["loss"])
        ref = float(z[f"loss_gating_{gating}"])
        out[f"gating_{gating}"] = {"jax": ours, "torch_fp64": ref, "rel_diff": abs(ours - ref) / abs(ref)}
    print(json.dumps(out, indent=1))
    return out


def argument_parser() -> argparse.ArgumentParser:
    """The step's flags (model, batch, crops, memory, timed steps), shared with profile_step.py."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="S/16")
    p.add_argument("--batch", type=int, default=8, help="per-device batch")
    p.add_argument("--precision", default="mixed", choices=PRECISIONS, help="the policy (mermed_jax/models/precision.py)")
    p.add_argument("--remat", default="none")
    p.add_argument("--num-global", type=int, default=2)
    p.add_argument("--num-local", type=int, default=10)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--memory", type=int, default=0, help="memory size K (0: the paper's 131,072)")
    p.add_argument("--config-args", default=None, help="extra key=value,... config overrides (mermed_jax/recipe/arguments.py)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    return p


def main(argv=None) -> dict:
    p = argument_parser()
    p.add_argument("--parts", action="store_true", help="also time the parts separately")
    p.add_argument("--peak-size", type=int, default=0, help="matmul n for the peak (0: 2048 CPU, 8192 else)")
    p.add_argument("--best-peak-gflops", type=float, default=0.0,
                   help="also quote MFU against this per-device peak (e.g. torch oneDNN bf16)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--check-loss-npz", default=None,
                   help="only compare memory_cross_entropy with the PyTorch reference's loss on the inputs in this file "
                        "(written by bench/torch_reference.py --check-loss)")
    args = p.parse_args(argv)
    if args.check_loss_npz:
        return check_loss(args.check_loss_npz)

    backend = jax.default_backend()
    config = build(args)
    n_dev = jax.device_count()
    t0 = time.perf_counter()
    setup = compile_step(config)
    compile_s = time.perf_counter() - t0
    compiled, state, batch, rng, hparams = setup.compiled, setup.state, setup.batch, setup.rng, setup.hparams
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    for _ in range(1):  # warm-up (the compiled executable; donation consumes the state)
        state, m = compiled(state, batch, rng, hparams)
        jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, rng, hparams)
        jax.block_until_ready((state.step, m))
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    loss = float(m["loss"])

    backbone = networks.backbone_config(config, teacher=False)
    by_part = flops.step_flops(config, backbone)
    analytic = float(sum(by_part.values()))
    n = args.peak_size or (2048 if backend == "cpu" else 8192)
    peaks = {dt: matmul_peak(dt, n) for dt in ("float32", "bfloat16")}
    achieved = analytic / sec
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "machine": {"backend": backend, "device_kind": jax.devices()[0].device_kind, "devices": n_dev,
                    "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "load_avg": os.getloadavg()},
        "config": {"variant": args.variant, "per_device_batch": args.batch, "global_batch": config.global_batch,
                   "precision": args.precision, "remat": args.remat, "memory": config.memory.size,
                   "crops": f"{config.crops.num_global}x{config.crops.global_size}+"
                            f"{config.crops.num_local}x{config.crops.local_size}"},
        "compile_s": compile_s,
        "step_s_median": sec, "step_s_all": times,
        "images_per_s": config.global_batch / sec,
        "loss": loss,
        "flops_analytic": analytic,
        "flops_analytic_by_part": by_part,
        "flops_xla_cost_analysis": xla_flops,
        "xla_over_analytic": xla_flops / analytic,
        "achieved_tflops_per_device": achieved / n_dev / 1e12,
        "matmul_peak_tflops": {dt: v / 1e12 for dt, v in peaks.items()},
        "matmul_peak_n": n,
        "mfu": achieved / (n_dev * peaks[str(policy(args.precision).matmul_operands)]),
        "mfu_vs_fp32_peak": achieved / (n_dev * peaks["float32"]),
        "mfu_vs_best_measured_peak": achieved / (n_dev * max(peaks.values())),
        "memory": _peak_memory(compiled),
    }
    if args.best_peak_gflops:
        result["mfu_vs_given_peak"] = achieved / (n_dev * args.best_peak_gflops * 1e9)
    if args.parts:
        parts = time_parts(config, state, batch, hparams, PIXEL_MEAN, PIXEL_STD, max(2, args.steps // 2))
        result["parts_s"] = parts
        result["parts_sum_s"] = sum(parts.values())
        part_flops = {"student_fwd_bwd": by_part["student_forward_backward"],
                      "teacher_fwd": by_part["teacher_forward"], "memory_loss": by_part["memory_loss"]}
        result["parts_tflops_per_device"] = {k: part_flops[k] / parts[k] / n_dev / 1e12 for k in part_flops}
    result["import_check"] = {mod: mod in sys.modules for mod in ("clu", "tensorflow", "grain")}
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
