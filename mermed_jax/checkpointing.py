"""Orbax checkpoints that hold the whole job: train state (student, teacher, optimiser, BatchNorm
statistics, memory queue with ids and pointers, step, skip counter), the Grain iterator of every
host, and a small JSON record (seed and RNG key, process count, per-host batch).

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), so a
process killed mid-save leaves the previous checkpoint intact. The state restores onto any mesh:
its arrays are restored with the shardings of the new run, and the memory's layout depends only
on its logical shards. The data iterator restores exactly when the process count and per-host
batch are unchanged; otherwise the caller restarts it deterministically from the seed and step.
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from mermed_jax import sharding, train_state


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any
    meta: dict
    data_restored: bool


def make_manager(workdir: pathlib.Path, checkpoint_config: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        keep_period=checkpoint_config.keep_period,
        enable_async_checkpointing=checkpoint_config.async_save,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict) -> bool:
    """Starts an async save now (all processes call it; the caller decides when)."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any,
            expected_meta: dict) -> Restored:
    """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    The data iterator is restored in place when the saved process count and per-host batch equal
    `expected_meta`'s; otherwise it is left alone and `data_restored` is False.
    """
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    same_layout = all(meta.get(k) == expected_meta.get(k) for k in ("process_count", "host_batch"))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if same_layout:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
        logging.warning(
            "checkpoint %d was written by %s processes with host batch %s; this run has %s and %s: "
            "the data pipeline restarts deterministically from the seed and step instead of its saved "
            "position (model, optimiser, teacher and memory restore exactly)",
            step, meta.get("process_count"), meta.get("host_batch"),
            expected_meta.get("process_count"), expected_meta.get("host_batch"),
        )
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(state=restored["state"], meta=meta, data_restored=same_layout)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what Orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_config(workdir: str | pathlib.Path) -> Any:
    """The resolved config a pretraining run wrote to its workdir."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a pretraining workdir (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_train_state(workdir: str | pathlib.Path, step: int | None = None) -> tuple[Any, Any, int]:
    """(state, config, step) of a pretraining checkpoint, restored onto this process's devices
    (replicated), for evaluation and export. step=None takes the latest complete checkpoint."""
    config = load_config(workdir)
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        item_handlers={"state": ocp.StandardCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint at step {step} (have {manager.all_steps()})")
    abstract = nn.unbox(jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0))))
    repl = sharding.replicated(sharding.make_mesh((-1, 1, 1), jax.local_devices()[:1]))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return state, config, step
