"""The gated MaSSL memory loss against a NumPy reference written from the paper's definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.koleo import koleo_loss
from mermed_jax.ssl.memory_loss import memory_cross_entropy

N_STUDENT, N_TEACHER, BATCH, DIM, SIZE, SHARDS, PART = 5, 2, 6, 8, 48, 4, 16


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_loss(student, teacher, queue, ids, modality, partition, t_s, t_t, gating):
    """Straight from the definition: per block, per row, per (i, j != i) pair, masked softmaxes."""
    total, rows = 0.0, 0
    n_pairs = 0
    for block in partition:
        keys, key_ids = queue[block], ids[block]
        for b in range(student.shape[1]):
            keep = (key_ids == modality[b]) if gating else np.ones(len(block), bool)
            rows += 1
            if not keep.any():
                continue
            for j in range(teacher.shape[0]):
                t = teacher[j, b] @ keys[keep].T / t_t
                p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
                for i in range(student.shape[0]):
                    if i == j:
                        continue
                    s = student[i, b] @ keys[keep].T / t_s
                    log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
                    total += -(p_t * log_p_s).sum()
    n_pairs = student.shape[0] * teacher.shape[0] - teacher.shape[0]
    return total / (rows * n_pairs)


def _memory(rng, ids):
    queue = _unit(rng.normal(size=(SIZE, DIM))).astype(np.float32)
    return memory_lib.MemoryState(
        queue=jnp.asarray(queue.reshape(SHARDS, SIZE // SHARDS, DIM)),
        ids=jnp.asarray(ids.reshape(SHARDS, SIZE // SHARDS).astype(np.int32)),
        ptr=jnp.zeros((SHARDS,), jnp.int32),
    )


def _case(ids, modality, seed=0):
    rng = np.random.default_rng(seed)
    student = _unit(rng.normal(size=(N_STUDENT, BATCH, DIM))).astype(np.float32)
    teacher = _unit(rng.normal(size=(N_TEACHER, BATCH, DIM))).astype(np.float32)
    memory = _memory(rng, ids)
    partition = memory_lib.stratified_partition(jax.random.key(seed), memory, PART)
    return student, teacher, memory, np.asarray(modality, np.int32), partition


def _run(student, teacher, memory, modality, partition, gating=None, t_t=0.05):
    gating = memory_lib.is_full(memory) if gating is None else jnp.asarray(gating)
    return memory_cross_entropy(
        jnp.asarray(student), jnp.asarray(teacher), memory, jnp.asarray(modality), partition,
        student_temp=0.1, teacher_temp=t_t, gating=gating,
    )


def _check(ids, modality, expect_gating):
    student, teacher, memory, modality, partition = _case(ids, modality)
    assert bool(memory_lib.is_full(memory)) == expect_gating
    out = _run(student, teacher, memory, modality, partition)
    ref = reference_loss(
        student, teacher, np.asarray(memory.queue).reshape(SIZE, DIM), np.asarray(memory.ids).reshape(-1),
        modality, np.asarray(partition), 0.1, 0.05, expect_gating,
    )
    np.testing.assert_allclose(float(out["loss"]), ref, rtol=2e-5)
    grad = jax.grad(lambda s: _run(s, teacher, memory, modality, partition)["loss"])(jnp.asarray(student))
    assert np.all(np.isfinite(np.asarray(grad))) and np.abs(np.asarray(grad)).sum() > 0
    return out


def test_initial_memory_is_not_gated():
    out = _check(np.full(SIZE, -1), [0, 1, 2, 3, 4, 5], expect_gating=False)
    assert float(out["valid_fraction"]) == 1.0


def test_partly_filled_memory_is_not_gated():
    ids = np.full(SIZE, -1)
    ids[: SIZE // 2] = np.arange(SIZE // 2) % 3
    _check(ids, [0, 1, 2, 0, 1, 2], expect_gating=False)


def test_full_memory_masks_other_modalities():
    ids = np.arange(SIZE) % 3
    out = _check(ids, [0, 1, 2, 2, 1, 0], expect_gating=True)
    assert float(out["valid_fraction"]) == 1.0
    # Gating changes the value: the same inputs without masking give another loss.
    student, teacher, memory, modality, partition = _case(ids, [0, 1, 2, 2, 1, 0])
    ungated = _run(student, teacher, memory, modality, partition, gating=False)
    assert abs(float(ungated["loss"]) - float(out["loss"])) > 1e-3


def test_row_without_same_modality_entry_contributes_zero():
    ids = np.zeros(SIZE, int)  # the memory holds only modality 0
    modality = [0, 0, 6, 0, 6, 0]  # rows 2 and 4 have no entry anywhere
    out = _check(ids, modality, expect_gating=True)
    assert float(out["valid_fraction"]) == pytest.approx(4 / 6)
    student, teacher, memory, modality_arr, partition = _case(ids, modality)
    grad = jax.grad(lambda s: _run(s, teacher, memory, modality_arr, partition)["loss"])(jnp.asarray(student))
    np.testing.assert_array_equal(np.asarray(grad)[:, [2, 4]], 0.0)


def test_masked_entries_contribute_exactly_zero():
    """Changing a masked entry's vector changes neither the loss nor any gradient."""
    ids = np.arange(SIZE) % 2
    student, teacher, memory, modality, partition = _case(ids, [0] * BATCH)
    other = np.asarray(memory.queue).copy()
    other[np.asarray(memory.ids) == 1] *= -1.0
    moved = memory.replace(queue=jnp.asarray(other))
    loss_fn = lambda mem: lambda s: _run(s, teacher, mem, modality, partition)["loss"]  # noqa: E731
    a = jax.value_and_grad(loss_fn(memory))(jnp.asarray(student))
    b = jax.value_and_grad(loss_fn(moved))(jnp.asarray(student))
    assert float(a[0]) == float(b[0])
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_teacher_temperature_sharpens_target():
    ids = np.full(SIZE, -1)
    args = _case(ids, [0] * BATCH)
    sharp = _run(*args, t_t=0.02)["teacher_entropy"]
    soft = _run(*args, t_t=0.2)["teacher_entropy"]
    assert float(sharp) < float(soft)


def _official_koleo(x):
    """MerMED-FM's koleo.py in NumPy: largest dot product (diagonal -1) is the neighbour, then
    nn.PairwiseDistance(2, eps=1e-8) (eps added to the difference) and -mean log(d + 1e-8)."""
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nearest = dots.argmax(1)
    return -np.mean(np.log(np.linalg.norm(x - x[nearest] + 1e-8, axis=-1) + 1e-8))


def test_koleo_matches_the_official_formula():
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(10, DIM))).astype(np.float64)
    np.testing.assert_allclose(float(koleo_loss(jnp.asarray(x, jnp.float32))), _official_koleo(x), rtol=1e-5)
    # the eps sits inside the norm: a duplicated row has distance ||1e-8 * ones|| = 1e-8 sqrt(d)
    dup = np.concatenate([x[:1], x[:1], x[1:4]]).astype(np.float64)
    expected = _official_koleo(dup)
    assert np.isclose(-np.log(1e-8 * np.sqrt(DIM) + 1e-8), -np.log(np.linalg.norm(np.full(DIM, 1e-8)) + 1e-8))
    np.testing.assert_allclose(float(koleo_loss(jnp.asarray(dup, jnp.float32))), expected, rtol=1e-4)


def test_koleo_term_is_the_mean_over_the_global_crops():
    """main_mermed.py: ko = (koleo(crop 0) + koleo(crop 1)) / 2, local crops left out."""
    import ml_collections

    from mermed_jax.ssl.objective import Embeddings, make_objective

    student, teacher, memory, modality, partition = _case(np.full(SIZE, -1), [0] * BATCH)
    config = ml_collections.ConfigDict({"loss": {"student_temp": 0.1, "koleo_weight": 0.5, "modality_gating": True},
                                        "crops": {"num_global": N_TEACHER}, "precision": "float32"})
    e = Embeddings(student=jnp.asarray(student), teacher=jnp.asarray(teacher), memory=memory,
                   modality=jnp.asarray(modality), partition=partition, teacher_temp=jnp.float32(0.05))
    metrics = make_objective(config)(e)
    expected = np.mean([_official_koleo(student[i].astype(np.float64)) for i in range(N_TEACHER)])
    np.testing.assert_allclose(float(metrics["koleo"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["memory_loss"]) + 0.5 * expected, rtol=1e-5)


def test_head_normalises_with_the_official_eps():
    """head.py: F.normalize(x, dim=-1, eps=1e-6), i.e. x / max(||x||, 1e-6)."""
    import flax.linen as nn

    from mermed_jax.models.head import HeadConfig, ProjectionHead

    head = ProjectionHead(HeadConfig(hidden_dim=16, bottleneck_dim=DIM, num_layers=1, use_bn=False))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    x[1] *= 1e4  # raw norms: rows 0 and 2 ~1e-9 (below the eps), row 1 ~1e-5 (above)
    params = nn.unbox(head.init(jax.random.key(0), jnp.asarray(x)))
    kernel = np.zeros((4, DIM), np.float32)
    kernel[:, :4] = 1e-9 * np.eye(4)
    params["params"]["mlp_0"]["kernel"] = jnp.asarray(kernel)
    out = np.asarray(head.apply(params, jnp.asarray(x)))
    raw = x @ kernel
    expected = raw / np.maximum(np.linalg.norm(raw, axis=-1, keepdims=True), 1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    norms = np.linalg.norm(out, axis=-1)
    assert norms[1] == pytest.approx(1.0, rel=1e-5) and norms[0] < 1e-2 and norms[2] < 1e-2


@pytest.mark.parametrize("gated", [False, True])
def test_loss_by_modality_is_the_loss_over_that_modalitys_rows(gated):
    ids = np.arange(SIZE) % 3 if gated else np.full(SIZE, -1)
    modality = np.asarray([0, 2, 2, 0, 2, 1], np.int32)
    student, teacher, memory, modality, partition = _case(ids, modality)
    out = _run(student, teacher, memory, modality, partition)
    rows = np.asarray(out["rows_by_modality"])
    np.testing.assert_array_equal(rows, [2, 1, 3, 0, 0, 0, 0])
    by_modality = np.asarray(out["loss_by_modality"])
    for m in range(3):  # the same rows alone, through the same partition, give the same loss
        keep = modality == m
        alone = _run(student[:, keep], teacher[:, keep], memory, modality[keep], partition)
        np.testing.assert_allclose(by_modality[m], float(alone["loss"]), rtol=1e-5)
    assert np.all(np.isnan(by_modality[3:]))  # no rows: not a loss of 0
    np.testing.assert_allclose((by_modality[:3] * rows[:3]).sum() / rows.sum(), float(out["loss"]), rtol=1e-5)


@pytest.mark.parametrize("modality_gating", [True, False])
def test_gating_off_is_plain_massl_on_a_full_memory(modality_gating):
    """loss.modality_gating=False (the ablation): a full memory is not masked by modality."""
    import ml_collections

    from mermed_jax.ssl.objective import Embeddings, gating_active, make_objective

    ids = np.arange(SIZE) % 3
    student, teacher, memory, modality, partition = _case(ids, [0, 1, 2] * (BATCH // 3) + [0] * (BATCH % 3))
    assert bool(memory_lib.is_full(memory))
    config = ml_collections.ConfigDict({"loss": {"student_temp": 0.1, "koleo_weight": 0.0,
                                                 "modality_gating": modality_gating},
                                        "crops": {"num_global": N_TEACHER}, "precision": "float32"})
    e = Embeddings(student=jnp.asarray(student), teacher=jnp.asarray(teacher), memory=memory,
                   modality=jnp.asarray(modality), partition=partition, teacher_temp=jnp.float32(0.05))
    assert bool(gating_active(config, memory)) == modality_gating
    expected = _run(student, teacher, memory, modality, partition, gating=modality_gating)["loss"]
    np.testing.assert_allclose(float(make_objective(config)(e)["memory_loss"]), float(expected), rtol=1e-6)
    other = _run(student, teacher, memory, modality, partition, gating=not modality_gating)["loss"]
    assert abs(float(expected) - float(other)) > 1e-3  # gating does change the loss here
