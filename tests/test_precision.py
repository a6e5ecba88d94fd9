"""Precision policies (mermed_jax/models/precision.py): each computes in the dtypes its table says,
and `mixed` and `bfloat16` agree with `float32` within their rounding.

The dtypes are read from the traced program (every dot_general and every transcendental op of the
student network's forward and backward pass), not from the modules' arguments, so a layer that
ignores the policy shows up here.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from repo import pixel_stats

from mermed_jax import sharding
from mermed_jax.eval.eval_config import eval_recipe
from mermed_jax.eval.eval_config import validate as validate_eval
from mermed_jax.models import networks
from mermed_jax.models.precision import POLICIES, PRECISIONS
from mermed_jax.ssl import memory as memory_lib
from mermed_jax.ssl.memory_loss import memory_cross_entropy
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.recipe import validation
from mermed_jax.training import checkpointing, train_state, train_step

F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
TRANSCENDENTAL = ("erf", "erfc", "exp", "log", "rsqrt", "tanh", "logistic")
SMALL = "model.depth=2,batch=4,crops.num_local=2,memory=64,partition=32"


def _equations(jaxpr):
    """Every equation of a jaxpr, its sub-jaxprs (pjit, custom_jvp, remat, scan, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _student_program(config):
    """The jaxpr of the student's forward and backward pass on the config's crops. Left out of the
    dots: the bicubic resize of the position embedding (fp32, a parameter's computation) and the
    attention's gradient matmuls (JAX's rule in every policy: see Policy.einsum)."""
    student, _ = networks.build_networks(config)
    crops = [jnp.zeros((2, 2, 32, 32, 3)), jnp.zeros((2, 2, 16, 16, 3))]
    variables = student.init({"params": jax.random.key(0)}, crops, train=False)

    def loss(params):
        out, _ = student.apply({"params": params, "batch_stats": variables["batch_stats"]}, crops, train=True,
                               rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
        return jnp.sum(out)

    return jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr


def _dots_and_transcendentals(config):
    dots, transcendental = [], set()
    for eqn in _equations(_student_program(config)):
        where = str(eqn.source_info.name_stack)
        if eqn.primitive.name == "dot_general" and not (
                "oh,hwd,pw->opd" in where or ("transpose(" in where and "/attn/b" in where)):
            dots.append((tuple(v.aval.dtype for v in eqn.invars), eqn.outvars[0].aval.dtype,
                         eqn.params.get("precision")))
        elif eqn.primitive.name in TRANSCENDENTAL:
            transcendental.add((eqn.primitive.name, eqn.invars[0].aval.dtype))
    return dots, transcendental


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_policy_computes_in_the_dtypes_of_its_table(tiny_config, precision):
    config = tiny_config(f"{SMALL},precision={precision}")
    dots, transcendental = _dots_and_transcendentals(config)
    operand_dtypes = {d for operands, _, _ in dots for d in operands}
    assert len(dots) > 40  # forward and backward matmuls of two blocks, the patch embedding and the head
    if precision == "float32":
        assert operand_dtypes == {F32} and {out for _, out, _ in dots} == {F32}
        assert all(p is not None and jax.lax.Precision.HIGHEST in p for _, _, p in dots)  # no TF32, no bf16 passes
        assert {dt for _, dt in transcendental} == {F32}
    elif precision == "mixed":
        # every matmul reads bf16 and returns fp32; all elementwise maths (GELU, norms, softmax) in fp32
        assert operand_dtypes == {BF16} and {out for _, out, _ in dots} == {F32}
        assert {dt for _, dt in transcendental} == {F32}
    else:
        # the backbone's matmuls read bf16 (and their products are rounded to bf16), the head's fp32
        assert operand_dtypes == {BF16, F32} and {out for _, out, _ in dots} == {F32}
        assert ("erfc", BF16) in transcendental and ("erfc", F32) in transcendental  # GELU: backbone bf16, head fp32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("precision", ["mixed", "bfloat16"])
def test_memory_loss_agrees_with_float32(precision):
    """Gated memory cross-entropy on embeddings with the structure of a trained network's (each
    modality's embeddings near its own direction), at the paper's temperatures."""
    rng = np.random.default_rng(0)
    n_student, n_teacher, batch, d, size, num_modalities = 6, 2, 14, 64, 1024, 7
    centres = _unit(rng.normal(size=(num_modalities, d)))
    modality = np.arange(batch) % num_modalities
    ids = np.arange(size) % num_modalities
    queue = _unit(centres[ids] + 0.6 * rng.normal(size=(size, d)) / np.sqrt(d))
    teacher = _unit(centres[modality] + 0.6 * rng.normal(size=(n_teacher, batch, d)) / np.sqrt(d))
    student = _unit(teacher[[0, 1] * (n_student // 2)] + 0.3 * rng.normal(size=(n_student, batch, d)) / np.sqrt(d))
    memory = memory_lib.MemoryState(queue=jnp.asarray(queue, jnp.float32).reshape(1, size, d),
                                    ids=jnp.asarray(ids, jnp.int32).reshape(1, size), ptr=jnp.zeros((1,), jnp.int32))
    partition = jnp.asarray(rng.permutation(size).reshape(4, size // 4), jnp.int32)

    def loss(p):
        out = memory_cross_entropy(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), memory,
                                   jnp.asarray(modality, jnp.int32), partition, student_temp=0.1, teacher_temp=0.07,
                                   gating=jnp.asarray(True), precision=p)
        return float(out["loss"])

    reference, got = loss("float32"), loss(precision)
    assert got == pytest.approx(reference, rel=1e-2)
    # bf16 similarity operands do change the loss; bfloat16 keeps fp32 ones, so its loss is float32's
    assert (got != reference) == (POLICIES[precision].memory_matmul_operands == BF16)


def _real_batch(realdata, tmp_path, config):
    """One balanced batch of real ISIC and NIH images, through the project's own pipeline."""
    from bench.input_pipeline import load_encoded
    from bench.input_pipeline import write_dataset as write_real
    from data_pipelines import pipeline

    config.data.dirs = (str(write_real(load_encoded(realdata, "isic", 8), "derm", tmp_path / "isic")),
                        str(write_real(load_encoded(realdata, "nih", 8), "cxr", tmp_path / "nih")))
    data = pipeline.TrainConfig.from_config(config.data, global_batch=None, crops=config.crops,
                                            seed=config.seed, per_device_batch=config.global_batch)
    return next(iter(pipeline.train_iterator(data, process_index=0, process_count=1, local_devices=1)))


@pytest.mark.realdata
def test_one_step_on_real_images_agrees_with_float32(realdata, tmp_path, tiny_config):
    """The memory loss of one train step (a ViT of width 192 and depth 4 on 64 px real images, the
    memory full so gating is on) in each policy, against float32's: within 1e-2 relative."""
    args = ("model.width=192,model.depth=4,model.num_heads=3,model.mlp_dim=768,model.variant=Ti/8,"
            "model.img_size=64,crops.global_size=64,crops.local_size=32,crops.num_local=2,batch=8,"
            "memory=256,partition=128")
    batch = _real_batch(realdata, tmp_path, tiny_config(args))
    mean, std = pixel_stats()
    losses = {}
    for precision in PRECISIONS:
        config = tiny_config(f"{args},precision={precision}")
        mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
        state, shardings = sharding.create_sharded(lambda: train_state.init_train_state(config, jax.random.key(0)), mesh)
        ids = state.memory.ids
        state = state.replace(memory=state.memory.replace(ids=jnp.arange(ids.size, dtype=jnp.int32).reshape(ids.shape) % 2))
        step = train_step.jit_train_step(train_step.make_train_step(config, mean, std), mesh, shardings)
        _, metrics = step(state, batch, jax.random.key(1), build_schedules(config).at(0))
        assert float(metrics["gating_active"]) == 1.0
        losses[precision] = float(metrics["memory_loss"])
    print("memory loss of one step on real images:", losses)
    for precision in ("mixed", "bfloat16"):
        assert losses[precision] == pytest.approx(losses["float32"], rel=1e-2), losses


def test_a_workdir_from_before_policies_reads_model_dtype_as_precision(tmp_path, tiny_config):
    saved = tiny_config().to_dict()
    del saved["precision"]
    saved["model"]["dtype"] = "bfloat16"
    (tmp_path / checkpointing.CONFIG_FILE).write_text(json.dumps(saved))
    loaded = checkpointing.load_config(tmp_path)
    assert loaded.precision == "bfloat16" and "dtype" not in loaded.model
    assert networks.backbone_config(loaded, teacher=True).precision == "bfloat16"


def test_a_wrong_policy_is_refused_by_name(tiny_config):
    with pytest.raises(ValueError, match="precision"):
        validation.check_keys_and_values(tiny_config("precision=float16"))
    eval_config = eval_recipe()
    eval_config.datasets = {"x": "somewhere"}
    eval_config.finetune.dtype = "bfloat16"
    with pytest.raises(ValueError, match="finetune.dtype: replaced by the top-level precision"):
        validate_eval(eval_config)


def test_matmul_refuses_a_spec_it_cannot_transpose():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="is not a matmul"):
        POLICIES["mixed"].einsum("ab,bc->c", x, jnp.ones((3, 4)))  # index a summed out of one operand


def test_an_evaluation_in_another_policy_is_tagged_with_it():
    from mermed_jax.eval.encoders import Encoder, with_precision
    from mermed_jax.models.vit import ViTConfig

    encoder = Encoder("step_000010", "checkpoint", ViTConfig(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4),
                      None, None, None)
    assert with_precision(encoder, "float32").tag == "step_000010"
    mixed = with_precision(encoder, "mixed")
    assert mixed.tag == "step_000010_mixed" and mixed.config.precision == "mixed"
