r"""Size a pretraining job before booking a pod: compile its train step ahead of time, on simulated
CPU devices, and print what each device holds and what the step moves between devices.

  python -m mermed_jax.plan_memory --config=configs/mermed_vitb16.py:variant=L/16,batch=64 \
      --devices=8 --mesh=1,8,1

Per device: parameters, optimiser state, teacher (parameters and BatchNorm statistics), memory
queue (rows, ids, pointers) and the batch, each summed over the shards the step's in_shardings
give that device (exact); then XLA's memory analysis of the compiled step: arguments, outputs,
aliased (donated) bytes and temporaries (activations, gradients and workspace). On XLA:CPU the
temporaries are the CPU compiler's buffer assignment, an estimate of what a TPU or GPU compile
assigns (fusion and layouts differ). Then the collective bytes per step from the compiled HLO,
loops counted (hlo_stats.py). Nothing is allocated, so a model far larger than this machine
plans fine; compiling takes minutes for large models (model.scan_layers=True compiles faster).
"""

import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax import sharding
from mermed_jax.recipe.validation import validate_config
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import hlo_stats, train_state, train_step


def _device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of `tree` (ShapeDtypeStructs) that one device holds under `shardings` (the largest)."""
    total = 0
    for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> dict[str, Any]:
    """Compiles the train step for `config` on a mesh of `devices`; returns per-device bytes."""
    validate_config(config, devices=devices)
    mesh = sharding.mesh_from_config(config.mesh, devices)
    boxed = jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0)))
    shardings = sharding.logical_shardings(boxed, mesh)
    state = nn.unbox(boxed)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    batch = train_step.abstract_batch(config)
    ones = np.ones((NUM_MODALITIES, 3), np.float32)
    step = train_step.jit_train_step(train_step.make_train_step(config, ones, ones, mesh=mesh), mesh, shardings)
    # Schedule values do not change the compiled program: one step per epoch needs no data to count.
    compiled = step.lower(abstract_state, batch, jax.random.key(0), build_schedules(config, 1).at(0)).compile()

    def part(name: str) -> int:
        return _device_bytes(getattr(state, name), getattr(shardings, name))

    batch_sharding = sharding.batch_sharding(mesh)
    analysis = compiled.memory_analysis()
    return {
        "devices": len(devices),
        "mesh": dict(zip(sharding.MESH_AXES, (int(n) for n in mesh.devices.shape))),
        "global_batch": config.global_batch,
        "params": part("params"),
        "optimizer": part("opt_state"),
        "teacher": part("teacher_params") + part("teacher_batch_stats"),
        "memory_queue": part("memory"),
        "other_state": part("batch_stats") + part("step") + part("skipped_steps") + part("nonfinite_streak"),
        "batch": _device_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch)),
        "xla_arguments": int(analysis.argument_size_in_bytes),
        "xla_outputs": int(analysis.output_size_in_bytes),
        "xla_aliased": int(analysis.alias_size_in_bytes),
        "xla_temporaries": int(analysis.temp_size_in_bytes),
        "collective_bytes": hlo_stats.collective_bytes(compiled.as_text()),
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:12.1f} MiB"


def format_plan(result: dict[str, Any]) -> str:
    state = sum(result[k] for k in ("params", "optimizer", "teacher", "memory_queue", "other_state"))
    peak = result["xla_arguments"] + result["xla_outputs"] - result["xla_aliased"] + result["xla_temporaries"]
    mesh = ", ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [
        f"per device, {result['devices']} devices, mesh {mesh}, global batch {result['global_batch']}",
        f"  parameters       {_mib(result['params'])}",
        f"  optimiser state  {_mib(result['optimizer'])}",
        f"  teacher          {_mib(result['teacher'])}",
        f"  memory queue     {_mib(result['memory_queue'])}",
        f"  other state      {_mib(result['other_state'])}",
        f"  state, total     {_mib(state)}",
        f"  batch            {_mib(result['batch'])}",
        "XLA memory analysis of the compiled step (XLA:CPU: an estimate for TPU/GPU)",
        f"  arguments        {_mib(result['xla_arguments'])}",
        f"  outputs          {_mib(result['xla_outputs'])}",
        f"  aliased (donated){_mib(result['xla_aliased'])}",
        f"  temporaries      {_mib(result['xla_temporaries'])}",
        f"  peak (args + outputs - aliased + temporaries) {_mib(peak)}",
        "collective operand bytes per step, per device (loops counted)",
        *(f"  {k:16s} {_mib(v)}" for k, v in result["collective_bytes"].items()),
    ]
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", flags.FLAGS.devices)
    config = flags.FLAGS.config
    if flags.FLAGS.mesh:
        config.mesh.shape = tuple(int(n) for n in flags.FLAGS.mesh.split(","))
    result = plan(config, jax.devices()[: flags.FLAGS.devices])
    print(json.dumps(result) if flags.FLAGS.json else format_plan(result))


def run() -> None:
    """The command line: flags are defined here, not at import, so the CLIs can be imported together (tests)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py), with :args.", lock_config=False)
    flags.DEFINE_integer("devices", 8, "Simulated devices to plan for.")
    flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes (-1: auto); default: the config's mesh.shape.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    flags.mark_flags_as_required(["config"])
    app.run(main)


if __name__ == "__main__":
    run()
