"""One MaSSL optimisation step as a pure function, and its jitted, explicitly sharded form.

step(state, batch, rng, hparams) -> (state, metrics):
  1. normalise the uint8 crops on device with per-modality mean/std;
  2. teacher forward on the global crops (no gradient, BatchNorm in training mode);
  3. student forward on all crops, one backbone pass per resolution and one head pass;
  4. the MaSSL objective (ssl/objective.py): gated block cross-entropy against the memory as it
     was before this step, plus the weighted regularisers;
  5. AdamW with per-tensor clipping and layer decay, skipped on device if anything is non-finite;
  6. EMA of the teacher; 7. enqueue the teacher's second-global-crop embeddings.
`hparams` carries this step's schedule values (ssl/schedules.py); `rng` is the run's base key, and
the step folds its own step number into it, so a resumed run draws the same numbers.

Non-finite steps (a deliberate difference from the official code). The official main_mermed.py
calls sys.exit(1) at the first non-finite loss, after that step's EMA and memory update have
already run (its GradScaler alone skips the optimiser step on inf/NaN gradients). Here a step
whose loss or gradients are not all finite changes nothing but the counters: student, optimiser
state, teacher EMA, BatchNorm statistics and memory keep their old values, `step` advances (the
next step takes the next batch), `skipped_steps` and `nonfinite_streak` count it. The host
(pretrain.py) stops the job with NonFiniteTrainingError once config.max_skipped_steps consecutive
steps were skipped, its last checkpoint untouched. Why: a pod job should not die, and lose its
queue slot and the steps since its last checkpoint, on one bad batch, while a diverged run still
stops at the streak limit; and the memory never takes in a non-finite row, which would poison
every later step's loss.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from data_pipelines.batch_spec import batch_layout
from data_pipelines.modalities import MODALITIES, NUM_MODALITIES
from mermed_jax import sharding as sharding_lib
from mermed_jax.models.networks import build_networks
from mermed_jax.preprocess import normalize_images
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.ema import ema_update
from mermed_jax.ssl.objective import Embeddings, gating_active, make_objective
from mermed_jax.training.train_state import TrainState, make_student_optimizer

Batch = dict[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]


def normalize_crops(crops: jnp.ndarray, modality: jnp.ndarray, mean: jnp.ndarray, std: jnp.ndarray) -> jnp.ndarray:
    """uint8 [B, n, H, W, 3] -> float32 [n, B, H, W, 3], normalised with the row's modality stats."""
    return jnp.swapaxes(normalize_images(crops, modality, mean, std), 0, 1)


def _embedding_std(embeddings: jnp.ndarray) -> jnp.ndarray:
    """Mean over dimensions of the across-batch std: ~1/sqrt(d) when healthy, ~0 at collapse."""
    flat = embeddings.reshape(-1, embeddings.shape[-1]).astype(jnp.float32)
    return jnp.mean(jnp.std(flat, axis=0))


def _all_finite(tree: Any) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _pool_loss_by_modality(loss: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
    """[micro, M] per-micro-batch modality losses -> [M], each micro-batch weighted by its rows of
    that modality; NaN for a modality absent from the whole batch (a 0 would read as a perfect fit)."""
    total_rows = jnp.sum(rows, axis=0)
    weighted = jnp.sum(jnp.where(rows > 0, loss * rows, 0.0), axis=0)
    return jnp.where(total_rows > 0, weighted / jnp.maximum(total_rows, 1.0), jnp.nan)


def make_loss_fn(config: ml_collections.ConfigDict, pixel_mean: jnp.ndarray, pixel_std: jnp.ndarray,
                 mesh: Mesh | None = None) -> Callable:
    """loss(params, teacher_params, state, batch, dropout_rng, partition, hparams) -> (loss, aux).

    Both networks run inside, so that a test can differentiate with respect to the teacher and
    see exact zeros. aux holds the metrics, both networks' new BatchNorm statistics and the
    teacher embeddings (the memory's next rows). With `mesh`, the memory loss runs sharded.
    """
    student_net, teacher_net = build_networks(config)
    num_global = config.crops.num_global
    objective = make_objective(config, mesh)
    pixel_mean = jnp.asarray(pixel_mean, jnp.float32)
    pixel_std = jnp.asarray(pixel_std, jnp.float32)

    def loss_fn(params, teacher_params, state: TrainState, batch: Batch, dropout_rng: jax.Array,
                partition: jnp.ndarray, hparams):
        modality = batch["modality"].astype(jnp.int32)
        global_crops = normalize_crops(batch["global"], modality, pixel_mean, pixel_std)
        crops = [global_crops]
        if batch.get("local") is not None and batch["local"].shape[1] > 0:
            crops.append(normalize_crops(batch["local"], modality, pixel_mean, pixel_std))

        teacher_emb, teacher_vars = teacher_net.apply(
            {"params": teacher_params, "batch_stats": state.teacher_batch_stats},
            [global_crops], train=True, mutable=["batch_stats"],
        )
        teacher_emb = jax.lax.stop_gradient(teacher_emb)
        student_emb, student_vars = student_net.apply(
            {"params": params, "batch_stats": state.batch_stats}, crops, train=True,
            rngs={"dropout": dropout_rng}, mutable=["batch_stats"],
        )
        metrics = objective(Embeddings(student_emb, teacher_emb, state.memory, modality, partition,
                                       hparams["teacher_temp"]))
        metrics["student_embedding_std"] = _embedding_std(student_emb[:num_global])
        metrics["teacher_embedding_std"] = _embedding_std(teacher_emb)
        aux = {
            "metrics": metrics,
            "batch_stats": student_vars["batch_stats"],
            "teacher_batch_stats": teacher_vars["batch_stats"],
            "teacher_embeddings": teacher_emb,
        }
        return metrics["loss"], aux

    return loss_fn


def abstract_batch(config: ml_collections.ConfigDict,
                   batch_sharding: NamedSharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes (data_pipelines.batch_spec), to compile the step before any data arrives."""
    layout = batch_layout(config.global_batch, config.crops)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding) for k, (shape, dtype) in layout.items()}


def random_batch(config: ml_collections.ConfigDict, rng: np.random.Generator,
                 num_modalities: int = NUM_MODALITIES) -> dict[str, np.ndarray]:
    """A global batch of abstract_batch's shapes: uniform-noise crops and random modalities, the
    input of benchmarks and of tests that need the step, not the data pipeline."""
    shapes = abstract_batch(config)
    crops = {k: rng.integers(0, 256, shapes[k].shape, dtype=np.uint8) for k in ("global", "local")}
    return {**crops, "modality": rng.integers(0, num_modalities, shapes["modality"].shape).astype(np.int32)}


def to_micro_batches(batch: Batch, num_micro: int, batch_shards: int) -> Batch:
    """[B, ...] -> [num_micro, B / num_micro, ...], each micro-batch taking an equal slice of every
    batch shard's rows, so that splitting moves no data between devices."""

    def split(x):
        per_shard = x.shape[0] // batch_shards
        x = x.reshape((batch_shards, num_micro, per_shard // num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape((num_micro, -1) + x.shape[3:])

    return jax.tree.map(split, batch)


def from_micro_batches(x: jnp.ndarray, batch_shards: int) -> jnp.ndarray:
    """Inverse of to_micro_batches for one array: [num_micro, B / num_micro, ...] -> [B, ...]."""
    num_micro, micro = x.shape[:2]
    x = x.reshape((num_micro, batch_shards, micro // batch_shards) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((num_micro * micro,) + x.shape[3:])


def make_train_step(config: ml_collections.ConfigDict, pixel_mean: jnp.ndarray, pixel_std: jnp.ndarray,
                    batch_shards: int = 1, *, mesh: Mesh | None = None) -> Callable:
    """The pure step for this config. pixel_mean/std: float32 [NUM_MODALITIES, 3].

    With `mesh` (what pretraining passes), the memory's partition, loss and enqueue run sharded
    over the batch devices (ssl/memory.py, ssl/memory_loss.py) and batch_shards is the mesh's; without
    it they run on whole arrays and XLA places them (correct, but it may all-gather the queue).

    Gradient accumulation (config.grad_accum_steps = A) splits the batch into A micro-batches
    (batch_shards: how many ways the batch is split over devices, so micro-batches stay local).
    Every micro-batch sees the memory as it was before the step and the step's one random
    partition; gradients and metrics are averaged; BatchNorm statistics are per micro-batch and
    running statistics update in sequence; then one optimiser update, one EMA move and one enqueue
    of all B teacher embeddings in batch order. With the head's BatchNorm off (and no stochastic
    depth or KoLeo, which also see only their micro-batch) this equals one step on the whole batch.
    """
    if mesh is not None:
        batch_shards = sharding_lib.num_batch_shards(mesh)
    loss_fn = make_loss_fn(config, pixel_mean, pixel_std, mesh)
    optimizer = make_student_optimizer(config)
    student_temp = config.loss.student_temp
    num_micro = config.grad_accum_steps
    partition_size = config.memory.partition_size
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, rng: jax.Array, hparams: dict[str, jnp.ndarray]):
        dropout_rng, partition_rng = jax.random.split(jax.random.fold_in(rng, state.step))
        partition = memory_lib.stratified_partition(partition_rng, state.memory, partition_size, mesh)
        micro_batches = to_micro_batches(batch, num_micro, batch_shards)

        def accumulate(carry, inputs):
            grad_sum, batch_stats, teacher_batch_stats = carry
            micro_batch, index = inputs
            micro_state = state.replace(batch_stats=batch_stats, teacher_batch_stats=teacher_batch_stats)
            (_, aux), grads = grad_fn(state.params, state.teacher_params, micro_state, micro_batch,
                                      jax.random.fold_in(dropout_rng, index), partition, hparams)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            carry = (grad_sum, aux["batch_stats"], aux["teacher_batch_stats"])
            return carry, (aux["metrics"], aux["teacher_embeddings"][1])

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, new_batch_stats, new_teacher_batch_stats), (micro_metrics, teacher_rows) = jax.lax.scan(
            accumulate, (zeros, state.batch_stats, state.teacher_batch_stats),
            (micro_batches, jnp.arange(num_micro)),
        )
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        loss_by_modality = _pool_loss_by_modality(micro_metrics.pop("loss_by_modality"),
                                                  micro_metrics.pop("rows_by_modality"))
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), micro_metrics)
        updates, new_opt_state = optimizer.update(
            grads, state.opt_state, state.params,
            learning_rate=hparams["learning_rate"], weight_decay=hparams["weight_decay"],
        )
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_params = keep_if_finite(new_params, state.params)
        new_teacher = ema_update(state.teacher_params, new_params, hparams["momentum"])
        new_memory = memory_lib.enqueue(state.memory, from_micro_batches(teacher_rows, batch_shards),
                                       batch["modality"], mesh)
        new_state = state.replace(
            step=state.step + 1,
            params=new_params,
            teacher_params=keep_if_finite(new_teacher, state.teacher_params),
            batch_stats=keep_if_finite(new_batch_stats, state.batch_stats),
            teacher_batch_stats=keep_if_finite(new_teacher_batch_stats, state.teacher_batch_stats),
            opt_state=keep_if_finite(new_opt_state, state.opt_state),
            memory=keep_if_finite(new_memory, state.memory),
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )

        fill = memory_lib.fill_fractions(state.memory)
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_params),
            "gating_active": gating_active(config, state.memory).astype(jnp.float32),
            "finite": finite.astype(jnp.float32),
            "student_temp": jnp.float32(student_temp),
            **{k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()},
            **{f"memory_fill/{name}": fill[i] for i, name in enumerate(MODALITIES)},
            **{f"memory_loss/{name}": loss_by_modality[i] for i, name in enumerate(MODALITIES)},
            "memory_fill/empty": fill[-1],
        }
        return new_state, metrics

    return step


class MeshBoundStep:
    """A jitted step that runs (and lowers) under its mesh and logical-axis rules.

    The context wraps each call from outside jit (where jax.set_mesh also works); the modules'
    activation constraints then resolve to this mesh.
    """

    def __init__(self, jitted: Callable, mesh: Mesh):
        self._jitted, self._mesh = jitted, mesh

    def __call__(self, *args):
        with sharding_lib.axis_rules_context(self._mesh):
            return self._jitted(*args)

    def lower(self, *args):
        with sharding_lib.axis_rules_context(self._mesh):
            return self._jitted.lower(*args)


def jit_train_step(step: Callable, mesh: Mesh, state_shardings: Any) -> MeshBoundStep:
    """jit with explicit shardings: state as created, batch over data x fsdp, the rest replicated.

    The state is donated: its buffers are reused for the new state.
    """
    repl = sharding_lib.replicated(mesh)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), repl, repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )
    return MeshBoundStep(jitted, mesh)
