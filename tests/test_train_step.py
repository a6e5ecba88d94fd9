"""The jitted train step: teacher without gradient, enqueue of the second global crop, metrics,
and on-device skipping of non-finite updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from repo import pixel_stats

from data_pipelines.modalities import MODALITIES
from mermed_jax import sharding
from mermed_jax.models import networks
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import train_state, train_step

MEAN, STD = pixel_stats()


@pytest.fixture(scope="module")
def setup(tiny_config):
    config = tiny_config("model.depth=1,crops.num_local=2")
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
    make_state = lambda: train_state.init_train_state(config, jax.random.key(0))  # noqa: E731
    _, shardings = sharding.create_sharded(make_state, mesh)
    step = train_step.jit_train_step(train_step.make_train_step(config, MEAN, STD), mesh, shardings)
    return config, mesh, make_state, step


def _batch(seed, config):
    return train_step.random_batch(config, np.random.default_rng(seed))


def test_teacher_receives_no_gradient(setup):
    config, mesh, make_state, _ = setup
    state, _ = sharding.create_sharded(make_state, mesh)
    loss_fn = train_step.make_loss_fn(config, MEAN, STD)
    hp = build_schedules(config).at(5)
    batch = jax.tree.map(jnp.asarray, _batch(0, config))
    partition = memory_lib.stratified_partition(jax.random.key(1), state.memory, config.memory.partition_size)
    g_student, g_teacher = jax.jit(jax.grad(  # jitted: op by op, the backward pass took 35 s
        lambda p, t: loss_fn(p, t, state, batch, jax.random.key(0), partition, hp)[0], argnums=(0, 1)
    ))(state.params, state.teacher_params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g_teacher))
    assert float(optax.tree.norm(g_student)) > 0


def test_step_updates_state_and_enqueues_second_global_crop(setup):
    config, mesh, make_state, step = setup
    state, _ = sharding.create_sharded(make_state, mesh)
    before = jax.tree.map(np.asarray, state)
    batch = _batch(1, config)
    hp = build_schedules(config).at(3)
    new_state, metrics = step(state, batch, jax.random.key(7), hp)
    assert int(new_state.step) == 1 and int(new_state.skipped_steps) == 0
    for key in ("loss", "teacher_entropy", "student_entropy", "grad_norm", "param_norm", "learning_rate",
                "weight_decay", "momentum", "teacher_temp", "student_temp", "student_embedding_std",
                "teacher_embedding_std", "memory_fill/ct", "memory_fill/empty", "gating_active"):
        assert np.isfinite(float(metrics[key])), key
    present = set(batch["modality"].tolist())
    for m, name in enumerate(MODALITIES):  # a modality with no rows in the batch has no loss, not 0
        assert np.isfinite(float(metrics[f"memory_loss/{name}"])) == (m in present), name
    assert float(metrics["learning_rate"]) == pytest.approx(float(hp["learning_rate"]))
    # the teacher's second-global-crop embeddings, one block of B/S rows per logical shard
    teacher_net = networks.build_networks(config)[1]
    crops = train_step.normalize_crops(jnp.asarray(batch["global"]), jnp.asarray(batch["modality"]), MEAN, STD)
    emb, _ = teacher_net.apply({"params": before.teacher_params, "batch_stats": before.teacher_batch_stats},
                               [crops], train=True, mutable=["batch_stats"])
    shards = config.memory.num_shards
    per = config.global_batch // shards
    queue, ids = np.asarray(new_state.memory.queue), np.asarray(new_state.memory.ids)
    np.testing.assert_allclose(queue[:, :per].reshape(-1, queue.shape[-1]), np.asarray(emb[1]), atol=1e-5)
    np.testing.assert_array_equal(ids[:, :per].reshape(-1), batch["modality"])
    np.testing.assert_array_equal(np.asarray(new_state.memory.ptr), per)
    np.testing.assert_array_equal(queue[:, per:], before.memory.queue[:, per:])
    # student moved; teacher is the EMA of the new student
    m = float(hp["momentum"])
    s_new, t_old = new_state.params["backbone"]["norm"]["bias"], before.teacher_params["backbone"]["norm"]["bias"]
    np.testing.assert_allclose(np.asarray(new_state.teacher_params["backbone"]["norm"]["bias"]),
                               m * t_old + (1 - m) * np.asarray(s_new), rtol=1e-6, atol=1e-7)


def test_non_finite_update_is_skipped_on_device(setup):
    config, mesh, make_state, step = setup
    state, _ = sharding.create_sharded(make_state, mesh)
    before = jax.tree.map(np.asarray, state)
    hp = build_schedules(config).at(3)
    hp["teacher_temp"] = np.float32(np.nan)  # poisons loss and gradients
    new_state, metrics = step(state, _batch(2, config), jax.random.key(7), hp)
    assert float(metrics["finite"]) == 0.0 and int(new_state.skipped_steps) == 1
    assert int(new_state.step) == 1
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(new_state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(before.memory.queue, np.asarray(new_state.memory.queue))


def test_micro_batch_split_keeps_rows_on_their_shard_and_inverts():
    x = jnp.arange(24).reshape(24, 1)
    micro = train_step.to_micro_batches({"x": x}, num_micro=3, batch_shards=4)["x"]
    assert micro.shape == (3, 8, 1)
    # micro-batch 0 takes the first 2 of each shard's 6 rows
    np.testing.assert_array_equal(micro[0, :, 0], [0, 1, 6, 7, 12, 13, 18, 19])
    np.testing.assert_array_equal(train_step.from_micro_batches(micro, 4), x)


def test_gradient_accumulation_equals_one_large_step_without_batchnorm(tiny_config):
    base = "model.depth=1,crops.num_local=2,head.use_bn=False"
    results = []
    for accum in (1, 4):
        config = tiny_config(f"{base},grad_accum_steps={accum}")
        mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:2])
        state, shardings = sharding.create_sharded(lambda c=config: train_state.init_train_state(c, jax.random.key(0)), mesh)
        step = train_step.jit_train_step(train_step.make_train_step(config, MEAN, STD, batch_shards=2), mesh, shardings)
        sched = build_schedules(config)
        for i in range(2):
            state, metrics = step(state, _batch(10 + i, config), jax.random.key(3), sched.at(i + 3))
        by_modality = np.asarray([float(metrics[f"memory_loss/{name}"]) for name in MODALITIES])
        results.append((jax.tree.map(np.asarray, state), float(metrics["loss"]), by_modality))
    (one, loss_one, by_modality_one), (four, loss_four, by_modality_four) = results
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    # micro-batches hold different modality mixes; pooling weights each by its rows
    np.testing.assert_allclose(by_modality_four, by_modality_one, rtol=1e-5)
    np.testing.assert_array_equal(one.memory.ids, four.memory.ids)
    # Summation order differs (4 partial gradients vs one), so compare with fp32 tolerances; the
    # Adam moments of tiny-gradient tensors are the most sensitive. The key bias (qkv bias [1]) has
    # an identically zero gradient (softmax ignores a per-query constant), so Adam turns rounding
    # noise into +-lr steps there: it is left out.
    leaves_four = jax.tree.leaves(four)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), leaves_four):
        name = jax.tree_util.keystr(path)
        if "qkv']['bias" in name:
            a, b = np.delete(a, 1, axis=0), np.delete(b, 1, axis=0)
        tolerance = 1e-2 if "opt_state" in name else 1e-4
        assert np.linalg.norm(a - b) <= tolerance * np.linalg.norm(a) + 1e-6, name
