"""Learning works: a tiny MerMED-FM trained for a few dozen seconds learns features a linear probe can use.

The tiny config (configs/demo_cpu.py: 32 px global and 16 px local crops, 4-px patches, width 64,
depth 2, memory K = 1,024 with batch 32, so the memory is full and modality gating active from
step 32 on) trains through the real jitted step on a one-device mesh, on synthetic images whose
four latent classes (stripe orientation x frequency, tests/synthetic_views.py) survive the crops,
flips and per-view colour jitter, while tint, brightness, contrast, phase and noise are nuisances.

The probe: logistic regression on the TEACHER backbone's CLS token (the network the paper
releases) for a centre view of held-out images, macro one-vs-rest AUROC on a held-out split. The
same probe on the randomly initialised network (teacher = student at step 0) must be weak
(<= 0.75: the task is not trivial) and the trained teacher must beat it by at least 0.1.

Measured (random -> trained teacher probe AUROC, 120 steps, base_lr 2e-2, EMA 0.9 -> 1, the
teacher temperature warming up per step as the official code does; 2026-11-29):
seed 0: 0.659 -> 0.916 (+0.26), seed 1: 0.720 -> 0.910 (+0.19), seed 2: 0.676 -> 0.801 (+0.13,
the thinnest margin seen), the seed fixed here. (With the earlier per-epoch warm-up: +0.11, +0.17,
+0.18.) Most of the margin comes from the per-view
colour jitter; without it the teacher gained only ~0.05. Runtime: about 35-45 s of CPU, 50-65 s
wall on the 2-core machine while other test runs share it (the train-step compilation, ~15 s
cold, is cached in .jax_cache afterwards).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import synthetic_views
from repo import pixel_stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from mermed_jax import sharding
from mermed_jax.models import networks
from mermed_jax.models.precision import PRECISIONS
from mermed_jax.models.vit import ViT
from mermed_jax.recipe import derived
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import train_state, train_step

SEED = 2
STEPS = 120
EPOCHS = 6  # the schedules' "epochs": 20 steps each, so the LR warms up over the first 20 steps
BATCH = 32
NUM_LOCAL = 2  # two 16 px local crops (the demo uses 4): cheaper steps, the same objective
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


def _config(tiny_config, precision):
    config = tiny_config(f"num_train_images={BATCH * STEPS // EPOCHS},epochs={EPOCHS},crops.num_local={NUM_LOCAL},"
                         f"precision={precision}")
    assert (config.crops.global_size, config.crops.local_size) == (32, 16)
    assert config.model.variant.endswith("/4") and (config.model.width, config.model.depth) == (64, 2)
    assert (config.memory.size, config.global_batch) == (1024, BATCH)
    assert derived.total_steps(config) == STEPS
    return config


def _probe_auroc(features: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest AUROC of a standardised logistic regression fitted on the first 2/3, scored on the rest."""
    n = len(features) * 2 // 3
    scaler = StandardScaler().fit(features[:n])
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(features[:n]), labels[:n])
    return float(roc_auc_score(labels[n:], clf.predict_proba(scaler.transform(features[n:])), multi_class="ovr"))


@functools.cache
def _train(precision: str):
    """(losses, gating per step, skipped steps, random and trained teacher probe AUROC), once per policy."""
    from repo import tiny_config_dict

    config = _config(tiny_config_dict, precision)
    rng = np.random.default_rng(SEED)
    train_images, train_labels = synthetic_views.make_images(rng, 512)
    modality = rng.integers(0, 2, len(train_images)).astype(np.int32)  # two modalities: gating masks half
    probe_images, probe_labels = synthetic_views.make_images(rng, 900)
    probe_views = synthetic_views.centre_views(probe_images, config.crops.global_size)

    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:1])
    state, shardings = sharding.create_sharded(
        lambda: train_state.init_train_state(config, jax.random.key(SEED)), mesh
    )
    step = train_step.jit_train_step(
        train_step.make_train_step(config, *pixel_stats(PIXEL_MEAN, PIXEL_STD)),
        mesh, shardings,
    )
    schedules = build_schedules(config)
    assert len(schedules) == STEPS

    backbone = ViT(networks.backbone_config(config, teacher=True))
    cls_features = jax.jit(lambda params, x: backbone.apply(
        {"params": params["backbone"]}, (x.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD, train=False,
    )["cls"])

    def teacher_auroc(state) -> float:
        return _probe_auroc(np.asarray(cls_features(state.teacher_params, probe_views)), probe_labels)

    random_auroc = teacher_auroc(state)  # at step 0 the teacher is the randomly initialised student

    losses, gating = [], []
    for i in range(STEPS):
        idx = rng.integers(0, len(train_images), BATCH)
        batch = synthetic_views.multicrop_batch(
            rng, train_images[idx], modality[idx], n_global=config.crops.num_global,
            global_size=config.crops.global_size, n_local=NUM_LOCAL, local_size=config.crops.local_size,
        )
        state, metrics = step(state, batch, jax.random.key(SEED + 1), schedules.at(i))
        losses.append(metrics["loss"])
        gating.append(metrics["gating_active"])
    losses, gating = np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(gating))
    return losses, gating, int(state.skipped_steps), random_auroc, teacher_auroc(state)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_tiny_config_learns_features_a_linear_probe_can_use(precision):
    losses, gating, skipped, random_auroc, trained_auroc = _train(precision)
    assert np.all(np.isfinite(losses)), losses
    assert skipped == 0
    steps_to_fill = 1024 // BATCH
    assert not gating[:steps_to_fill].any() and gating[steps_to_fill:].all()  # gating from step 32 on
    assert random_auroc <= 0.75, f"the random network's probe is already at {random_auroc:.3f}: the task is too easy"
    assert trained_auroc >= random_auroc + 0.1, (
        f"probe AUROC: random {random_auroc:.3f}, trained teacher {trained_auroc:.3f} (loss {losses[0]:.2f} -> {losses[-1]:.2f})"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["mixed", "bfloat16"])
def test_policies_reach_the_loss_of_float32(precision):
    """The same 120 steps from the same initialisation: the mean loss of the last 20 steps within
    2% of float32's (the rounding of bf16 operands changes the trajectory, not where it goes)."""
    reference, got = _train("float32")[0][-20:].mean(), _train(precision)[0][-20:].mean()
    assert got == pytest.approx(reference, rel=0.02)
