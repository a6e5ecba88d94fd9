"""MaSSL's memory cross-entropy with modality gating (a term of ssl/objective.py).

The memory loss compares how the student and the teacher place each crop among the K memory
embeddings: softmax(teacher . memory / t_teacher) is the target for log_softmax(student . memory
/ t_student), computed inside random blocks of the memory and averaged over blocks, rows and
(student crop i, teacher crop j != i) pairs. Once the memory is full, entries of another modality
are masked out of both softmaxes (modality gating).

Masking without NaN: masked logits are first replaced by a large finite negative value (so the
softmaxes give them exactly zero weight and nothing downstream sees inf), and their terms are then
zeroed with a second `where`. A row whose block holds no entry of its modality contributes 0.

Memory: at the paper's scale the full [crops x B, K] logits would be about 0.8 GB per device, so
the loss runs block by block in a scan whose body is rematerialised in the backward pass; only one
block's logits live at a time.

Sharded (pass `mesh`): the queue's logical shards and the batch are split over the same N = data
x fsdp devices (see memory.py), and the partition's columns are split so that each device holds
the P/N columns of every block that lie in its own shards. Per block, each device gathers its own
P/N keys and ids and all-gathers them over the batch axes: one block's P x d keys, never the K x d
queue. Each device then computes the exact block softmaxes for its own B/N rows (a row's softmax
needs all P columns of the block, which it now has), and the four sums are psum'd once at the end.
Columns arrive in partition order, so the arithmetic is the single-device one. Cost per device
and step: P x d floats received per block, twice (the backward pass rematerialises the block,
gather included, rather than keep every block's keys, which would be the whole queue again),
i.e. about 2 K d floats per step (268 MB at K = 131,072, d = 256 in fp32, about 40% of the bytes
of ViT-B's fp32 gradient all-reduce); the logits FLOPs split N ways. The alternative, partial
logits over each device's own columns with psum'd softmax normalisers, would move only
O(crops x B) floats per block, but needs every device to hold all crops x B student rows and
distributed max/sum-exp reductions inside the block; the gather keeps the block arithmetic
identical to the single-device loss, which the equivalence tests rely on.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax.models import precision as precision_lib
from mermed_jax.sharding import BATCH_AXES
from mermed_jax.ssl.memory import MemoryState

_MASKED_LOGIT = -1e9  # far below any logit: |cosine / temperature| <= 1 / 0.01


def _masked_log_softmax(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.log_softmax(jnp.where(mask, logits, _MASKED_LOGIT), axis=-1)


def _block_sums(student: jnp.ndarray, teacher: jnp.ndarray, queue: jnp.ndarray, ids: jnp.ndarray,
                modality: jnp.ndarray, columns: jnp.ndarray, student_temp: jnp.ndarray,
                teacher_temp: jnp.ndarray, gating: jnp.ndarray, axes: tuple[str, ...],
                policy: precision_lib.Policy) -> jnp.ndarray:
    """[4 + NUM_MODALITIES] sums over this device's rows: cross-entropy, teacher and student
    entropy, valid rows, then the cross-entropy of each modality's rows.

    queue [R, d], ids [R]: the rows this device holds; columns [num_blocks, P/N]: this device's
    columns of each block, as indices into them. `axes`: the mesh axes the block's columns are
    gathered over (none without a mesh).
    """
    n_student, n_teacher = student.shape[0], teacher.shape[0]
    pair_mask = (jnp.arange(n_student)[:, None] != jnp.arange(n_teacher)[None, :]).astype(jnp.float32)
    modality_onehot = jax.nn.one_hot(modality, NUM_MODALITIES, dtype=jnp.float32)  # [B, M]

    def gather(x):
        return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x

    def block(totals, block_columns):
        keys = gather(queue[block_columns].astype(policy.memory_matmul_operands))  # [P, d]
        key_ids = gather(ids[block_columns])  # [P]
        mask = jnp.logical_or(~gating, key_ids[None, :] == modality[:, None])  # [B, P]
        valid_row = jnp.any(mask, axis=-1)  # [B]
        s_logp = _masked_log_softmax(policy.memory_einsum("nbd,pd->nbp", student, keys) / student_temp, mask)
        t_logp = _masked_log_softmax(policy.memory_einsum("nbd,pd->nbp", teacher, keys) / teacher_temp, mask)
        t_prob = jnp.exp(t_logp)
        s_logp_safe = jnp.where(mask, s_logp, 0.0)
        t_logp_safe = jnp.where(mask, t_logp, 0.0)
        cross = -jnp.einsum("jbp,ibp->ijb", t_prob, s_logp_safe)  # [Ns, Nt, B]
        cross = jnp.where(valid_row, cross, 0.0)
        row_loss = jnp.sum(cross * pair_mask[:, :, None], axis=(0, 1))  # [B]
        t_entropy = jnp.sum(jnp.where(valid_row, -jnp.sum(t_prob * t_logp_safe, -1), 0.0))
        s_entropy = jnp.sum(jnp.where(valid_row, -jnp.sum(jnp.exp(s_logp) * s_logp_safe, -1), 0.0))
        sums = jnp.stack([jnp.sum(row_loss), t_entropy / n_teacher, s_entropy / n_student,
                          jnp.sum(valid_row).astype(jnp.float32)])
        return totals + jnp.concatenate([sums, row_loss @ modality_onehot]), None

    zeros = jnp.zeros((4 + NUM_MODALITIES,), jnp.float32)
    if axes:  # the sums differ per device until the psum; shard_map's scan wants that declared
        zeros = jax.lax.pcast(zeros, axes, to="varying")
    totals, _ = jax.lax.scan(jax.checkpoint(block), zeros, columns)
    return jax.lax.psum(totals, axes) if axes else totals


def memory_cross_entropy(
    student: jnp.ndarray,
    teacher: jnp.ndarray,
    memory: MemoryState,
    modality: jnp.ndarray,
    partition: jnp.ndarray,
    *,
    student_temp: float | jnp.ndarray,
    teacher_temp: float | jnp.ndarray,
    gating: jnp.ndarray,
    mesh: Mesh | None = None,
    precision: str = "float32",
) -> dict[str, jnp.ndarray]:
    """Gated block cross-entropy between teacher and student similarities to the memory.

    Args:
      student: [Ns, B, d] unit student embeddings; its first Nt crops are the teacher's crops.
      teacher: [Nt, B, d] unit teacher embeddings (no gradient flows into them).
      memory: the queue before this step's enqueue.
      modality: [B] modality id per row.
      partition: [num_blocks, P] flat memory column indices, one random partition per step, in
        stratified_partition's layout (P/S columns of each logical shard, in shard order).
      gating: scalar bool; when True, other-modality entries are masked.
      mesh: when given, the sharded scheme of the module docstring (batch and queue split over
        the mesh's data x fsdp devices); the result is the same.
      precision: the policy (models/precision.py) whose memory operands the similarities use;
        softmaxes and sums are fp32 in every policy.
    Returns:
      dict with `loss` and per-row mean `teacher_entropy`, `student_entropy`, and
      `valid_fraction` (rows whose block had at least one same-modality entry); `rows_by_modality`
      [NUM_MODALITIES] counts the batch's rows of each modality and `loss_by_modality` is `loss`
      over those rows alone (NaN for a modality with no rows), so that `loss` is their
      row-weighted mean.
    """
    policy = precision_lib.policy(precision)
    n_student, batch, dim = student.shape
    n_teacher = teacher.shape[0]
    rows_per_shard = memory.ids.shape[1]
    args = (
        student.astype(jnp.float32),
        jax.lax.stop_gradient(teacher.astype(jnp.float32)),
        jax.lax.stop_gradient(memory.queue),
        memory.ids,
        modality,
        partition,
        jnp.asarray(student_temp, jnp.float32),
        jnp.asarray(teacher_temp, jnp.float32),
        jnp.asarray(gating),
    )

    def local_sums(student, teacher, queue, ids, modality, partition, student_temp, teacher_temp, gating,
                   axes=()):
        # This device's shards as rows [R, d]; its columns as indices into them.
        first_row = jax.lax.axis_index(axes) * queue.shape[0] * rows_per_shard if axes else 0
        return _block_sums(student, teacher, queue.reshape(-1, dim), ids.reshape(-1), modality,
                           partition - first_row, student_temp, teacher_temp, gating, axes, policy)

    if mesh is None:
        totals = local_sums(*args)
    else:
        rows, shards, repl = PartitionSpec(None, BATCH_AXES), PartitionSpec(BATCH_AXES), PartitionSpec()
        totals = jax.shard_map(
            lambda *a: local_sums(*a, axes=BATCH_AXES), mesh=mesh,
            in_specs=(rows, rows, shards, shards, shards, rows, repl, repl, repl), out_specs=repl,
        )(*args)
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)
    num_blocks = partition.shape[0]
    num_rows = num_blocks * batch
    rows_by_modality = jnp.sum(jax.nn.one_hot(modality, NUM_MODALITIES, dtype=jnp.float32), axis=0)
    return {
        "loss": totals[0] / (num_rows * n_pairs),
        "teacher_entropy": totals[1] / num_rows,
        "student_entropy": totals[2] / num_rows,
        "valid_fraction": totals[3] / num_rows,
        "loss_by_modality": totals[4:] / (num_blocks * rows_by_modality * n_pairs),
        "rows_by_modality": rows_by_modality,
    }
