"""The train step on 8 simulated devices equals the step on 1 device, for every mesh layout.

Parameters whose gradient is exactly zero in exact arithmetic are left out of the comparison,
and a test asserts that their gradient is ~0 on 1 device. In floating point such a gradient is
rounding noise (~1e-9) whose value depends on the order of the sums, i.e. on the mesh, and Adam
divides it by sqrt(v) ~ |noise|, so those entries move by +-lr in mesh-dependent directions:
their relative difference between meshes is O(1) by construction (measured: 0.9 after one step),
not a sharding error. They are:
  - the key part of each attention qkv bias: q . (k + b) shifts all of a query's logits by
    q . b, which the softmax removes (every run, BatchNorm or not);
  - with the head's BatchNorm on, the bias of each Dense feeding a BatchNorm (head mlp_0 and
    mlp_1) and the backbone's final LayerNorm bias (it only feeds mlp_0): the BatchNorm
    subtracts the batch mean, removing any constant shift.
So the full equivalence (loss, student, teacher, memory; after 1 and 5 steps; four meshes) runs
with head.use_bn=False, at 1e-5 after 1 step and 2e-5 after 5: Adam also amplifies the rounding of
an entry whose later gradient nearly cancels its first moment (m / sqrt(v) of a small
difference). Measured on the (8, 1, 1) mesh with the per-step teacher-temperature warm-up: one
element of the 64-entry fc2 bias differs by 1.2e-8 at step 2 (its update is ~4e-5): that bias's
relative difference is 2.2e-5 after step 2, falling to 9.5e-6 (student) and 1.26e-5 (EMA teacher)
after step 5, when every other leaf is below 5e-6; a sharding error would show as O(1) differences. A BatchNorm-on run on the (2, 2, 2) mesh must agree with 1 device
on the loss at 1e-5 and on all other parameters at 1e-4, not 1e-5: the BatchNorm backward pass
subtracts the batch mean of the incoming gradient, so some gradient entries are small
differences with a larger relative rounding error, and Adam's first updates of zero-initialised
biases (g / (|g| + eps)) pass that relative error on (measured: backbone fc1 bias 2.7e-5 after
one step, every other parameter below 1e-5). The loss agreeing at 1e-5 shows that the head's
BatchNorm uses global-batch statistics on a mesh: per-device statistics would change it at step 1.

S = 8 logical memory shards, global batch 16, K = 48 = 3 x batch: the memory is full after the
third step, so modality gating is active in steps 4 and 5.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from repo import pixel_stats

from data_pipelines.modalities import NUM_MODALITIES
from mermed_jax import sharding
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.memory_loss import memory_cross_entropy
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import hlo_stats, train_state, train_step

MEAN, STD = pixel_stats()
ARGS = ("model.depth=1,crops.num_local=2,batch=16,memory=48,partition=16,shards=8,"
        "crops.global_size=16,crops.local_size=8,model.img_size=16")
STEPS = 5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2)]
RTOL = 1e-5
RTOL_AFTER_STEPS = 2e-5  # after several steps: see the module docstring
BN_RTOL = 1e-4


def _batches(config, steps: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [train_step.random_batch(config, rng, num_modalities=3) for _ in range(steps)]


def _train(config, mesh_shape, devices, steps=STEPS) -> list[tuple[dict, float]]:
    """(state as NumPy, loss) after each step, on a mesh of `devices`."""
    mesh = sharding.make_mesh(mesh_shape, devices)
    state, shardings = sharding.create_sharded(lambda: train_state.init_train_state(config, jax.random.key(0)), mesh)
    step = train_step.jit_train_step(train_step.make_train_step(config, MEAN, STD, mesh=mesh), mesh, shardings)
    schedules = build_schedules(config)
    out = []
    for i, batch in enumerate(_batches(config, steps)):
        state, metrics = step(state, sharding.to_global(batch, sharding.batch_sharding(mesh)), jax.random.key(1), schedules.at(i + 3))
        out.append((jax.tree.map(np.asarray, state), float(metrics["loss"]), float(metrics["gating_active"])))
    return out


# Parameters with identically zero gradient (see the docstring), by path suffix.
BN_ZERO_GRADIENT = ("['backbone']['norm']['bias']", "['head']['mlp_0']['bias']", "['head']['mlp_1']['bias']")


def _with_gradient(path: str, x: np.ndarray, use_bn: bool) -> np.ndarray | None:
    """The part of a parameter whose gradient is not identically zero (None: no such part)."""
    if path.endswith("['attn']['qkv']['bias']"):
        return np.delete(x, 1, axis=0)  # [q|k|v, heads, head_dim]: drop the keys' bias
    if use_bn and path.endswith(BN_ZERO_GRADIENT):
        return None
    return x


def _relative_differences(a, b, use_bn: bool) -> dict[str, float]:
    """Per leaf ||a - b|| / ||a||, over the entries with a real gradient."""
    leaves_a = jax.tree_util.tree_flatten_with_path(a)[0]
    leaves_b = jax.tree.leaves(b)
    out = {}
    for (path, x), y in zip(leaves_a, leaves_b):
        name = jax.tree_util.keystr(path)
        x, y = (_with_gradient(name, np.asarray(v, np.float64), use_bn) for v in (x, y))
        if x is not None:
            out[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30))
    return out


def _assert_states_close(ref_state, state, use_bn: bool, where, rtol: float = RTOL) -> None:
    for part in ("params", "teacher_params", "memory"):
        diffs = _relative_differences(getattr(ref_state, part), getattr(state, part), use_bn)
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= rtol, (where, part, worst, diffs[worst])
    np.testing.assert_array_equal(ref_state.memory.ids, state.memory.ids)
    np.testing.assert_array_equal(ref_state.memory.ptr, state.memory.ptr)


@pytest.fixture(scope="module")
def reference(tiny_config):
    config = tiny_config(f"{ARGS},head.use_bn=False")
    return config, _train(config, (1, 1, 1), jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", MESHES)
def test_mesh_equals_one_device(reference, mesh_shape):
    config, ref = reference
    got = _train(config, mesh_shape, jax.devices())
    assert [g for _, _, g in ref] == [0.0, 0.0, 0.0, 1.0, 1.0]  # gating active in steps 4 and 5
    for i in (0, STEPS - 1):  # after 1 and after 5 steps
        (ref_state, ref_loss, _), (state, loss, _) = ref[i], got[i]
        assert loss == pytest.approx(ref_loss, rel=RTOL)
        _assert_states_close(ref_state, state, use_bn=False, where=(mesh_shape, i + 1),
                             rtol=RTOL if i == 0 else RTOL_AFTER_STEPS)


@pytest.mark.slow
def test_batchnorm_on_agrees_except_zero_gradient_parameters(tiny_config):
    config = tiny_config(f"{ARGS},head.use_bn=True")
    steps = 3
    ref = _train(config, (1, 1, 1), jax.devices()[:1], steps)
    got = _train(config, (2, 2, 2), jax.devices(), steps)
    for i, ((ref_state, ref_loss, _), (state, loss, _)) in enumerate(zip(ref, got)):
        assert loss == pytest.approx(ref_loss, rel=RTOL)
        _assert_states_close(ref_state, state, use_bn=True, where=i + 1, rtol=BN_RTOL)


# Mixed and bfloat16 round matmul operands (bfloat16 also its activations) to bf16. A row rounds
# alike on every mesh, but a sum that the mesh orders differently can fall on the other side of a
# rounding boundary. Measured after one step on the (2, 2, 2) mesh (2026-11-30), largest relative
# difference of any leaf: mixed: loss 2.3e-5, student 6.7e-5, teacher 6.7e-6, memory 6.5e-8;
# bfloat16: loss 1.4e-4, memory 1.8e-3, and one LayerNorm bias of the student 0.25. With bf16
# activations, the gradient of such an entry is below the rounding noise of the sums that make it,
# and Adam's first step (g / |g|) moves it by +-lr in a mesh-dependent direction (the module
# docstring's argument for fp32's zero-gradient entries, at bf16's noise level), so bfloat16 is
# compared on its loss and its memory (the teacher's embeddings: every layer's forward pass).
POLICY_RTOL = {"mixed": 3e-4, "bfloat16": 1e-2}


@pytest.mark.slow
@pytest.mark.parametrize("precision", list(POLICY_RTOL))
def test_mesh_equals_one_device_in_each_policy(tiny_config, precision):
    config = tiny_config(f"{ARGS},head.use_bn=False,precision={precision}")
    (ref_state, ref_loss, _), = _train(config, (1, 1, 1), jax.devices()[:1], steps=1)
    (state, loss, _), = _train(config, (2, 2, 2), jax.devices(), steps=1)
    rtol = POLICY_RTOL[precision]
    assert loss == pytest.approx(ref_loss, rel=rtol / 10)
    if precision == "mixed":
        _assert_states_close(ref_state, state, use_bn=False, where=precision, rtol=rtol)
    else:
        diffs = _relative_differences(ref_state.memory, state.memory, use_bn=False)
        assert max(diffs.values()) <= rtol, diffs
        np.testing.assert_array_equal(ref_state.memory.ids, state.memory.ids)


@pytest.mark.parametrize("use_bn", [False, True])
def test_left_out_parameters_have_zero_gradient(tiny_config, use_bn):
    config = tiny_config(f"{ARGS},head.use_bn={use_bn}")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state, _ = sharding.create_sharded(lambda: train_state.init_train_state(config, jax.random.key(0)), mesh)
    loss_fn = train_step.make_loss_fn(config, MEAN, STD)
    batch = jax.tree.map(jnp.asarray, _batches(config, 1)[0])
    partition = memory_lib.stratified_partition(jax.random.key(2), state.memory, config.memory.partition_size)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, state.teacher_params, state, batch, jax.random.key(0), partition,
                                               build_schedules(config).at(3))[0]))(state.params)
    total = float(optax.tree.norm(grads))
    left_out = 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name, g = jax.tree_util.keystr(path), np.asarray(g, np.float64)  # sums of squares of ~1e-10 values
        kept = _with_gradient(name, g, use_bn)
        zero = np.sqrt(max(np.sum(g**2) - (0.0 if kept is None else np.sum(kept**2)), 0.0))
        if kept is None or kept.size < g.size:
            left_out += 1
            assert zero <= 1e-6 * total, (name, zero, total)
    assert left_out == 1 + 3 * use_bn  # depth 1: one qkv bias; with BatchNorm three more leaves


def test_memory_ops_move_one_block_of_keys_at_a_time():
    """Compiled on 8 devices: enqueue and partition move nothing; the loss and its gradient
    all-gather each device's P/N keys and ids once per block and once more in the rematerialised
    backward pass, i.e. 2 (K/N) (d + 1) words per device, never the queue; the only all-reduces
    are the gating flag and the psum'd sums. XLA left to itself (no mesh) moves 8x more."""
    size, dim, shards, batch, part = 4096, 64, 8, 64, 512
    mesh = sharding.make_mesh((8, 1, 1))
    on_shards = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    on_rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
    memory = jax.device_put(memory_lib.init_memory(jax.random.key(0), size, dim, shards), on_shards)
    student = jax.device_put(jnp.ones((4, batch, dim)), on_rows)
    teacher = jax.device_put(jnp.ones((2, batch, dim)), on_rows)
    modality = jax.device_put(jnp.zeros((batch,), jnp.int32), on_shards)

    def collectives(mesh_arg):
        def fn(student, memory, rng):
            partition = memory_lib.stratified_partition(rng, memory, part, mesh_arg)
            loss = lambda s: memory_cross_entropy(  # noqa: E731
                s, teacher, memory, modality, partition, student_temp=0.1, teacher_temp=0.05,
                gating=memory_lib.is_full(memory), mesh=mesh_arg)["loss"]
            return jax.value_and_grad(loss)(student), memory_lib.enqueue(memory, teacher[1], modality, mesh_arg)

        jitted = jax.jit(fn, out_shardings=((None, on_rows), on_shards))
        return hlo_stats.collective_bytes(jitted.lower(student, memory, jax.random.key(1)).compile().as_text())

    sharded = collectives(mesh)
    assert sharded["all-gather"] == 2 * (size // 8) * (dim + 1) * 4
    # psum of the 4 sums and the 7 per-modality loss sums (fp32), and the gating flag (pred)
    assert sharded["all-reduce"] == 4 * (4 + NUM_MODALITIES) + 1
    assert sharded["reduce-scatter"] == sharded["all-to-all"] == sharded["collective-permute"] == 0
    assert sum(collectives(None).values()) >= 7 * sum(sharded.values())


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
    """What device_grid reads of a device: enough to lay out a pod this machine does not have."""

    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def _ids(grid: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.id)(grid)


def test_hybrid_mesh_puts_dcn_axes_across_nodes():
    """8 GPUs, one process per GPU pair, 2 processes to a node (processes_per_granule=2): the data
    axis (DCN) crosses nodes, fsdp and tensor (ICI) stay inside one."""
    devices = [_FakeDevice(i, i // 2) for i in range(8)]
    grid = sharding.device_grid((1, 2, 2), devices, dcn_shape=(2, 1, 1), processes_per_granule=2)
    assert grid.shape == (2, 2, 2)
    for node in range(2):
        assert {d.process_index // 2 for d in grid[node].flat} == {node}
    np.testing.assert_array_equal(_ids(grid), np.arange(8).reshape(2, 2, 2))


def test_hybrid_mesh_groups_tpu_devices_by_slice_with_auto_sizes():
    # Two slices whose devices are listed interleaved: each data row must be one slice.
    devices = [_FakeDevice(i, i // 4, slice_index=i % 2) for i in range(8)]
    grid = sharding.device_grid((1, -1, 2), devices, dcn_shape=(-1, 1, 1))
    assert grid.shape == (2, 2, 2)
    assert [{d.slice_index for d in grid[s].flat} for s in range(2)] == [{0}, {1}]
    # a dcn factor on fsdp splits the fsdp axis across slices instead
    grid = sharding.device_grid((1, 2, 2), devices, dcn_shape=(1, 2, 1))
    assert grid.shape == (1, 4, 2)
    assert [{d.slice_index for d in grid[0, f].flat} for f in range(4)] == [{0}, {0}, {1}, {1}]


def test_hybrid_mesh_errors_name_the_key():
    devices = [_FakeDevice(i, i // 3) for i in range(6)]
    with pytest.raises(ValueError, match=r"mesh\.granule='slice': cpu devices have no slice_index"):
        sharding.device_grid((1, 3, 1), devices, dcn_shape=(2, 1, 1), granule="slice")
    with pytest.raises(ValueError, match=r"mesh\.shape=\(1, 2, 1\) does not divide the 3 devices"):
        sharding.device_grid((1, 2, 1), devices, dcn_shape=(2, 1, 1))
    uneven = [_FakeDevice(i, 0 if i < 4 else 1) for i in range(6)]
    with pytest.raises(ValueError, match="granules hold different device counts"):
        sharding.device_grid((1, -1, 1), uneven, dcn_shape=(2, 1, 1))
