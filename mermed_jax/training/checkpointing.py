"""Orbax checkpoints that hold the whole job: train state (student, teacher, optimiser, BatchNorm
statistics, memory queue with ids and pointers, step, skip counter), the Grain iterator of every
host, and a small JSON record (seed and RNG key, process count, per-host batch).

Saves are asynchronous and atomic, so a process killed mid-save leaves the previous checkpoint
intact: on a local or shared filesystem Orbax writes a temporary directory and renames it; in a
gs:// bucket, which has no rename, it writes the step's final name and marks it complete last
(commit_success.txt). Completed steps are found with Orbax's own check of either mark
(complete_steps), never by the name alone. Orbax has no s3:// support (it would write a local
folder named "s3:"), so such a workdir is refused before anything compiles (check_workdir). The state restores onto any mesh:
its arrays are restored with the shardings of the new run, and the memory's layout depends only
on its logical shards. The data iterator restores exactly when the process count and per-host
batch are unchanged; otherwise the caller restarts it deterministically from the seed and step.

Failures are the project's own errors: a save that cannot be written (full disk, quota) is a
CheckpointSaveError naming the directory, the cause and the last complete checkpoint; a checkpoint
that cannot be read back, or whose arrays no longer match the digest recorded when it was saved
(OCDBT data files carry no checksum: a flipped bit restored silently), is a CheckpointCorruptError.

Evaluation and export read the teacher alone (load_teacher), checked against the same digest.
"""

import dataclasses
import functools
import json
import logging
import operator
import os
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage
from mermed_jax import sharding
from mermed_jax.training import train_state

DIGEST_KEY = "state_digest"
CONFIG_FILE = "config.json"  # the resolved config, written by pretrain at every start


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; earlier complete checkpoints are untouched."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint that cannot be restored, or restores to other values than were saved."""


def _set_aside(step_dir: str) -> str:
    """What to do with a damaged step's directory, on a filesystem or in a bucket (which has no rename)."""
    if storage.is_remote(step_dir):
        how = f"gcloud storage rm -r {step_dir}, after a gcloud storage cp -r to keep a copy"
    else:
        how = f"rm -r {step_dir}, or mv it out of the checkpoints folder to keep it"
    return f"Delete this step's directory ({how})"


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, with save failures raised as CheckpointSaveError.

    An async save fails in a background thread; Orbax re-raises the error at the next save() or at
    wait_until_finished(), as whatever TensorStore raised (a full disk is "ValueError: OUT_OF_RANGE
    ... File too large"), under hundreds of lines of interleaved thread tracebacks.
    """

    _in_flight: int | None = None

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        self.wait_until_finished()  # Orbax waits here anyway; this attributes an async failure to its step
        try:
            saved = super().save(step, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - TensorStore and the OS fail in many types
            raise self._failed(step, e) from None
        self._in_flight = step  # after: Orbax's save calls wait_until_finished, which resets it
        return saved

    def wait_until_finished(self) -> None:
        try:
            super().wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(self._in_flight, e) from None
        self._in_flight = None

    def _failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
        complete = complete_steps(self.directory)
        return CheckpointSaveError(
            f"{self.directory}: saving the checkpoint of step {step} failed ({storage.first_line(error)}). "
            f"The last complete checkpoint is step {complete[-1] if complete else None}, untouched; "
            "free space (or fix the cause) and rerun the same command to resume from it."
        )


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps whose checkpoint Orbax finalized, read from the directory: renamed from its temporary
    name locally, marked by commit_success.txt in a bucket (a step still being written, or cut off
    mid-save, has its final name there already). Transient storage errors are retried."""
    return storage.retrying(lambda: sorted(ocp.path.step.checkpoint_steps(storage.path(directory))), directory,
                            "listing complete checkpoints")


def check_workdir(workdir: str | os.PathLike, what: str = "the workdir", *, writable: bool = True) -> None:
    """Refuses, before anything compiles or loads, a checkpoint location Orbax cannot use or the job
    may not use: s3:// (no Orbax support), a missing bucket, denied requests."""
    if os.fspath(workdir).startswith("s3://"):
        raise storage.StorageError(
            f"{os.fspath(workdir)}: {what} cannot be on s3://: its checkpoints are written by Orbax, which "
            "has no S3 support (it would write a local folder named 's3:' instead). Put it on gs:// or a "
            "shared filesystem (NFS, EFS, Lustre, or a gcsfuse mount such as /gcs/bucket/run). data.dirs, "
            "evaluation outputs (--eval_dir) and exports (--out) may be on s3://.")
    storage.check_bucket(workdir, writable=writable)


def _leaf_digest(x: jax.Array) -> jax.Array:
    """[sum of 32-bit words, sum of words x (2i + 1)] mod 2^32: any one changed word changes both
    (the weights are odd), a moved word the second."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]  # 8: two words
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    words = words.reshape(-1)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=4)
def _digest_fn(out_sharding: jax.sharding.Sharding | None):
    """One jitted function per output sharding, so a job compiles its digest once, not per save."""
    return jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves], out_shardings=out_sharding)


# XLA:CPU materialises every leaf's words and weighted words for its reductions, all before the first
# reduction: digesting a ViT-B/16 teacher (343 MB) in one program took 730 MB more at its peak. Runs
# of leaves of at most this many elements (or one larger leaf) bound that to twice the run: 64 MiB.
_DIGEST_RUN_ELEMENTS = 1 << 23


def _runs(leaves: tuple[Any, ...]) -> list[list[Any]]:
    """Consecutive leaves in runs of at most _DIGEST_RUN_ELEMENTS elements, the same on every process."""
    runs, size = [[]], 0
    for x in leaves:
        if runs[-1] and size + x.size > _DIGEST_RUN_ELEMENTS:
            runs.append([])
            size = 0
        runs[-1].append(x)
        size += x.size
    return runs


def state_digest(state: Any) -> dict[str, list[int]]:
    """Per-leaf digest of a (possibly sharded) state, computed on device; the same on every mesh."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
    # Replicated outputs, so that every process can read them when the state spans several hosts.
    mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else None
    digests = [d for run in _runs(leaves) for d in _digest_fn(out)(run)]
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(d)] for path, d in zip(paths, digests)}


def _field_path(path: tuple[str, ...]) -> str:
    """How a TrainState digest names the subtree at `path` (a field, then dict keys): ".teacher_params['backbone']"."""
    return jax.tree_util.keystr((jax.tree_util.GetAttrKey(path[0]), *map(jax.tree_util.DictKey, path[1:])))


def _subset_digest(tree: dict, paths: tuple[tuple[str, ...], ...]) -> dict[str, list[int]]:
    """state_digest of the subtrees of a partially restored state, keyed as the whole state's digest keys them."""
    found = {}
    for path in paths:
        subtree = functools.reduce(operator.getitem, path, tree)
        if jax.tree.leaves(subtree):  # a head without BatchNorm has empty batch statistics
            found.update({_field_path(path) + key: digest for key, digest in state_digest(subtree).items()})
    return found


def _verify(state: Any, meta: dict, where: str, paths: tuple[tuple[str, ...], ...] | None = None) -> None:
    """Checks the restored arrays against the digest saved with them: all of the state, or, for a
    partial restore, the subtrees at `paths` (every saved leaf under them, and nothing else)."""
    saved = meta.get(DIGEST_KEY)
    if saved is None:  # written before digests were recorded
        return
    if paths is None:
        found = state_digest(state)
    else:
        found = _subset_digest(state, paths)
        prefixes = tuple(_field_path(path) for path in paths)
        saved = {key: digest for key, digest in saved.items() if key.startswith(prefixes)}
    changed = sorted(k for k in saved if found.get(k) != saved[k])
    if changed or set(found) != set(saved):
        raise CheckpointCorruptError(
            f"{where}: the restored arrays differ from those saved ({len(changed)} of {len(saved)} leaves changed, "
            f"first {changed[:3]}): the checkpoint files were damaged after the save. {_set_aside(where)} "
            "to resume from the previous complete checkpoint."
        )


def _restore_or_explain(manager: ocp.CheckpointManager, step: int, args: Any) -> Any:
    try:
        return manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - TensorStore, JSON and pytree errors of a damaged directory
        others = [s for s in complete_steps(manager.directory) if s != step]
        step_dir = f"{manager.directory}/{step}"
        raise CheckpointCorruptError(
            f"{step_dir}: the checkpoint cannot be restored ({storage.first_line(e)}); its files are damaged or "
            f"incomplete. {_set_aside(step_dir)} to resume from another complete checkpoint (steps {others})."
        ) from None


@dataclasses.dataclass(frozen=True)
class Restored:
    state: Any
    meta: dict
    data_restored: bool


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """WORKDIR/checkpoints, as the path type Orbax takes (absolute when local)."""
    return storage.path(workdir) / "checkpoints"


def make_manager(workdir: str | os.PathLike, checkpoint_config: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        keep_period=checkpoint_config.keep_period,
        enable_async_checkpointing=checkpoint_config.async_save,
        cleanup_tmp_directories=True,
    )
    return _Manager(
        checkpoint_dir(workdir),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any, meta: dict) -> bool:
    """Starts an async save now (all processes call it; the caller decides when). The meta records
    the state's digest, which every restore checks."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave({**meta, DIGEST_KEY: state_digest(state)}),
        ),
        force=True,
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any,
            expected_meta: dict) -> Restored:
    """Restores `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    The data iterator is restored in place when the saved process count and per-host batch equal
    `expected_meta`'s; otherwise it is left alone and `data_restored` is False.
    """
    meta = _restore_or_explain(manager, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
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
    restored = _restore_or_explain(manager, step, ocp.args.Composite(**items))
    _verify(restored["state"], meta, f"{manager.directory}/{step}")
    return Restored(state=restored["state"], meta=meta, data_restored=same_layout)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what Orbax restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_config(workdir: str | os.PathLike) -> Any:
    """The resolved config a pretraining run wrote to its workdir (the first thing evaluation and
    export read, so an s3:// workdir is refused here, not by Orbax)."""
    check_workdir(workdir, "a workdir to read checkpoints from", writable=False)
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: not a pretraining workdir (no {CONFIG_FILE})")
    saved = json.loads(storage.read_text(path))
    if "dtype" in saved.get("model", {}):  # written before precision policies: model.dtype was one
        saved.setdefault("precision", saved["model"].pop("dtype"))
    return ml_collections.ConfigDict(saved)


# What a teacher-only restore reads: the teacher's backbone; with the head, also the head and its
# BatchNorm statistics. Paths into the TrainState: a field, then dict keys.
TEACHER_BACKBONE = (("teacher_params", "backbone"),)
TEACHER_WITH_HEAD = (("teacher_params",), ("teacher_batch_stats",))


def _open_step(workdir: str | os.PathLike, step: int | None, state_handler: Any) -> tuple[ocp.CheckpointManager, int, bool]:
    """A read-only manager of a workdir's checkpoints, the step to read (None: the latest complete
    one) and whether that step has the job's meta item."""
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": state_handler, "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step() if step is None else step
    steps = manager.all_steps()
    if step is None or step not in steps:
        manager.close()
        wanted = "no complete checkpoint" if step is None else f"no checkpoint at step {step}"
        raise FileNotFoundError(f"{directory}: {wanted} (have steps {list(steps)})")
    # A checkpoint written without the job's meta item (by hand, or a state-only export) has no
    # digest to check; the state itself still restores.
    return manager, step, storage.exists(directory / str(step) / "meta")


def _restore_target(config: Any) -> Any:
    """The TrainState's shapes (nothing allocated), replicated on this process's first device."""
    abstract = nn.unbox(jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0))))
    repl = sharding.replicated(sharding.make_mesh((-1, 1, 1), jax.local_devices()[:1]))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)


def load_train_state(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, Any, int]:
    """(state, config, step) of a pretraining checkpoint, all of it (optimiser and memory too),
    restored onto this process's devices (replicated). step=None takes the latest complete
    checkpoint. Evaluation and export need only the teacher: load_teacher reads a fraction of it."""
    config = load_config(workdir)
    manager, step, has_meta = _open_step(workdir, step, ocp.StandardCheckpointHandler())
    items = {"state": ocp.args.StandardRestore(_restore_target(config))}
    if has_meta:
        items["meta"] = ocp.args.JsonRestore()
    restored = _restore_or_explain(manager, step, ocp.args.Composite(**items))
    manager.close()
    state = restored["state"]
    _verify(state, restored["meta"] if has_meta else {}, f"{workdir}/checkpoints/{step}")
    return state, config, step


def load_teacher(workdir: str | os.PathLike, step: int | None = None, with_head: bool = False) -> tuple[dict, Any, int]:
    """(teacher, config, step): the teacher of a pretraining checkpoint and nothing else, for
    evaluation and export. teacher is {"teacher_params": {"backbone"}} (with_head: {"teacher_params":
    {"backbone", "head"}, "teacher_batch_stats": {...}}), indexed as the TrainState's fields are.

    A partial Orbax restore reads only those arrays, so the student, the optimiser's moments (twice
    the student for Adam) and the memory queue are never read nor allocated: a ViT-B/16 teacher
    loads in a fraction of the full state's memory (bench/export_read.py). The digest saved with the
    checkpoint is checked for the leaves restored. step=None takes the latest complete checkpoint.
    """
    config = load_config(workdir)
    paths = TEACHER_WITH_HEAD if with_head else TEACHER_BACKBONE
    full = _restore_target(config)
    target: dict = {}  # the subtrees at `paths`, in nested dicts
    for path in paths:
        parent = functools.reduce(lambda node, key: node.setdefault(key, {}), path[:-1], target)
        parent[path[-1]] = functools.reduce(operator.getitem, path[1:], getattr(full, path[0]))
    # StandardRestore refuses a partial item; PyTreeRestore reads the same files with partial_restore.
    manager, step, has_meta = _open_step(workdir, step, ocp.PyTreeCheckpointHandler())
    items = {"state": ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)}
    if has_meta:
        items["meta"] = ocp.args.JsonRestore()
    restored = _restore_or_explain(manager, step, ocp.args.Composite(**items))
    manager.close()
    teacher = restored["state"]
    _verify(teacher, restored["meta"] if has_meta else {}, f"{workdir}/checkpoints/{step}", paths)
    return teacher, config, step
