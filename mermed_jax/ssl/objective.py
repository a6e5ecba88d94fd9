"""The MaSSL objective: named loss terms and their weights, composed in one place (dinov2's pattern).

    loss = 1 x memory cross-entropy (memory_loss.py; gated by modality once the memory is full)
         + loss.koleo_weight x KoLeo, the mean over the global student crops (koleo.py)

Each term is a function of the step's embeddings, returning its value and the metrics it logs;
the value is logged under the term's name whatever its weight, so a term at weight 0 still shows
how the run behaves on it. A new term is one module and one entry of `massl_terms`.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.koleo import koleo_loss
from mermed_jax.ssl.memory_loss import memory_cross_entropy

Metrics = dict[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """What every term sees: one step's embeddings and the memory as it was before the step."""

    student: jnp.ndarray  # [student crops, B, d], global crops first
    teacher: jnp.ndarray  # [global crops, B, d], no gradient
    memory: memory_lib.MemoryState
    modality: jnp.ndarray  # [B] ids
    partition: jnp.ndarray  # this step's random blocks of memory columns
    teacher_temp: jnp.ndarray  # this step's scheduled teacher temperature


TermFn = Callable[[Embeddings], tuple[jnp.ndarray, Metrics]]


def gating_active(config: ml_collections.ConfigDict, memory: memory_lib.MemoryState) -> jnp.ndarray:
    """Whether modality gating masks this step's memory: once the memory is full, unless the
    config turns gating off (plain MaSSL)."""
    return jnp.logical_and(memory_lib.is_full(memory), config.loss.modality_gating)


def _memory_term(e: Embeddings, *, config: ml_collections.ConfigDict, mesh: Mesh | None) -> tuple[jnp.ndarray, Metrics]:
    metrics = memory_cross_entropy(
        e.student, e.teacher, e.memory, e.modality, e.partition, student_temp=config.loss.student_temp,
        teacher_temp=e.teacher_temp, gating=gating_active(config, e.memory), mesh=mesh, precision=config.precision,
    )
    return metrics.pop("loss"), metrics


def _koleo_term(e: Embeddings, *, num_global: int) -> tuple[jnp.ndarray, Metrics]:
    """KoLeo averaged over the global student crops, as the official main_mermed.py does."""
    return sum(koleo_loss(e.student[i]) for i in range(num_global)) / num_global, {}


def massl_terms(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> dict[str, tuple[float, TermFn]]:
    """{metric name: (weight, term)}: the objective's only list of terms."""
    return {
        "memory_loss": (1.0, functools.partial(_memory_term, config=config, mesh=mesh)),
        "koleo": (config.loss.koleo_weight, functools.partial(_koleo_term, num_global=config.crops.num_global)),
    }


def make_objective(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Callable[[Embeddings], Metrics]:
    """objective(embeddings) -> metrics, with metrics["loss"] the weighted sum of the terms.

    With `mesh`, the memory cross-entropy runs sharded over the batch axes (memory_loss.py).
    """
    terms = massl_terms(config, mesh)

    def objective(embeddings: Embeddings) -> Metrics:
        metrics: Metrics = {}
        for name, (_, term) in terms.items():
            metrics[name], extra = term(embeddings)
            metrics.update(extra)
        metrics["loss"] = sum(weight * metrics[name] for name, (weight, _) in terms.items())
        return metrics

    return objective
