"""MaSSL's memory cross-entropy with modality gating, and the KoLeo regulariser.

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
"""

import jax
import jax.numpy as jnp

from mermed_jax.ssl.memory import MemoryState

_MASKED_LOGIT = -1e9  # far below any logit: |cosine / temperature| <= 1 / 0.01


def _masked_log_softmax(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.log_softmax(jnp.where(mask, logits, _MASKED_LOGIT), axis=-1)


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
) -> dict[str, jnp.ndarray]:
    """Gated block cross-entropy between teacher and student similarities to the memory.

    Args:
      student: [Ns, B, d] unit student embeddings; its first Nt crops are the teacher's crops.
      teacher: [Nt, B, d] unit teacher embeddings (no gradient flows into them).
      memory: the queue before this step's enqueue.
      modality: [B] modality id per row.
      partition: [num_blocks, P] flat memory column indices, one random partition per step.
      gating: scalar bool; when True, other-modality entries are masked.
    Returns:
      dict with `loss` and per-row mean `teacher_entropy`, `student_entropy`, and
      `valid_fraction` (rows whose block had at least one same-modality entry).
    """
    n_student, batch, dim = student.shape
    n_teacher = teacher.shape[0]
    queue = jax.lax.stop_gradient(memory.queue.reshape(-1, dim))
    ids = memory.ids.reshape(-1)
    student = student.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    pair_mask = (jnp.arange(n_student)[:, None] != jnp.arange(n_teacher)[None, :]).astype(jnp.float32)
    n_pairs = n_student * n_teacher - min(n_student, n_teacher)

    def block(totals, columns):
        keys = queue[columns]  # [P, d]
        mask = jnp.logical_or(~gating, ids[columns][None, :] == modality[:, None])  # [B, P]
        valid_row = jnp.any(mask, axis=-1)  # [B]
        s_logp = _masked_log_softmax(jnp.einsum("nbd,pd->nbp", student, keys) / student_temp, mask)
        t_logp = _masked_log_softmax(jnp.einsum("nbd,pd->nbp", teacher, keys) / teacher_temp, mask)
        t_prob = jnp.exp(t_logp)
        s_logp_safe = jnp.where(mask, s_logp, 0.0)
        t_logp_safe = jnp.where(mask, t_logp, 0.0)
        cross = -jnp.einsum("jbp,ibp->ijb", t_prob, s_logp_safe)  # [Ns, Nt, B]
        cross = jnp.where(valid_row, cross, 0.0)
        loss_sum = jnp.sum(cross * pair_mask[:, :, None])
        t_entropy = jnp.sum(jnp.where(valid_row, -jnp.sum(t_prob * t_logp_safe, -1), 0.0))
        s_entropy = jnp.sum(jnp.where(valid_row, -jnp.sum(jnp.exp(s_logp) * s_logp_safe, -1), 0.0))
        totals = (
            totals[0] + loss_sum,
            totals[1] + t_entropy / n_teacher,
            totals[2] + s_entropy / n_student,
            totals[3] + jnp.sum(valid_row),
        )
        return totals, None

    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(4))
    totals, _ = jax.lax.scan(jax.checkpoint(block), zeros, partition)
    num_blocks = partition.shape[0]
    rows = num_blocks * batch
    return {
        "loss": totals[0] / (rows * n_pairs),
        "teacher_entropy": totals[1] / rows,
        "student_entropy": totals[2] / rows,
        "valid_fraction": totals[3] / rows,
    }


def koleo_loss(embeddings: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """KoLeo (DINOv2): -mean log distance of each embedding to its nearest neighbour in the batch.

    Spreads embeddings out; applied per global crop on the student's [B, d] unit embeddings.
    """
    x = embeddings.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    dots = jnp.where(jnp.eye(x.shape[0], dtype=bool), -1.0, dots)
    nearest = x[jnp.argmax(dots, axis=1)]
    distances = jnp.linalg.norm(x - nearest + 1e-6, axis=-1)  # torch.pairwise_distance's eps
    return -jnp.mean(jnp.log(distances + eps))
