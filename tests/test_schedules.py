"""Per-step schedules with DINO's semantics, checked at chosen steps against closed forms."""

import math

import numpy as np
import pytest
from repo import ROOT

from mermed_jax.recipe import derived
from mermed_jax.recipe.arguments import load_config_file
from mermed_jax.ssl.schedules import (
    build_schedules,
    cosine_schedule,
    teacher_temperature_schedule,
)


def load_config(name, arg=None):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


def test_warmup_starts_at_zero_and_reaches_peak_at_its_last_step():
    s = cosine_schedule(1.0, 0.0, total_steps=100, warmup_steps=10)
    assert len(s) == 100 and s[0] == 0.0
    assert s[9] == pytest.approx(1.0) and s[5] == pytest.approx(5 / 9)
    # after warmup: half cosine over the remaining 90 steps, starting at the peak
    assert s[10] == pytest.approx(1.0)
    assert s[10 + 45] == pytest.approx(0.5)
    assert s[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_paper_schedules_at_chosen_steps():
    config = load_config("mermed_vitb16")
    assert derived.steps_per_epoch(config) == 3223
    sched = build_schedules(config)
    n = derived.steps_per_epoch(config)
    total = 100 * n
    assert len(sched) == total
    peak = 5e-5 * 1024 / 256
    assert sched.learning_rate[0] == 0.0
    assert sched.learning_rate[10 * n - 1] == pytest.approx(peak)
    mid = 10 * n + (total - 10 * n) // 2
    assert sched.learning_rate[mid] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6), rel=1e-4)
    assert sched.learning_rate[-1] == pytest.approx(1e-6, rel=1e-3)
    assert sched.weight_decay[0] == pytest.approx(0.04) and sched.weight_decay[-1] == pytest.approx(0.4, rel=1e-6)
    assert sched.weight_decay[total // 2] == pytest.approx(0.22, rel=1e-6)
    assert sched.momentum[0] == pytest.approx(0.9995) and sched.momentum[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diff(sched.momentum) >= 0)
    # teacher temperature: MerMED-FM's per-step linspace 0.04 -> 0.07 over 10 epochs, then constant
    warm = 10 * n
    assert sched.teacher_temp[0] == pytest.approx(0.04)
    assert sched.teacher_temp[1] == pytest.approx(0.04 + 0.03 / (warm - 1))
    assert sched.teacher_temp[n - 1] == pytest.approx(0.04 + 0.03 * (n - 1) / (warm - 1))
    assert sched.teacher_temp[n] == pytest.approx(0.04 + 0.03 * n / (warm - 1))
    assert sched.teacher_temp[warm - 1] == pytest.approx(0.07) and sched.teacher_temp[warm] == pytest.approx(0.07)
    assert np.all(np.diff(sched.teacher_temp[:warm]) > 0)  # rises every step, not once per epoch
    assert np.all(sched.teacher_temp[warm:] == np.float64(0.07))
    values = sched.at(10 * n - 1)
    assert values["learning_rate"] == np.float32(peak)
    assert sched.at(10**9)["learning_rate"] == np.float32(sched.learning_rate[-1])


def _official_teacher_temp(warmup_temp, temp, warmup_epochs, epochs, niter_per_ep):
    """main_mermed.py's teacher_temp_schedule: utils.cosine_scheduler with base = final = temp."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(warmup_temp, temp, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    return np.concatenate([warmup, temp + 0.5 * (temp - temp) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize("warmup_epochs,epochs,steps_per_epoch", [(10, 100, 7), (3, 5, 4), (0, 3, 5), (2, 2, 3)])
def test_teacher_temperature_is_the_official_per_step_schedule(warmup_epochs, epochs, steps_per_epoch):
    ours = teacher_temperature_schedule(0.04, 0.07, warmup_epochs, epochs, steps_per_epoch)
    official = _official_teacher_temp(0.04, 0.07, warmup_epochs, epochs, steps_per_epoch)
    np.testing.assert_array_equal(ours, official)
    total = epochs * steps_per_epoch
    np.testing.assert_array_equal(ours, cosine_schedule(0.07, 0.07, total, warmup_epochs * steps_per_epoch, 0.04))


def test_teacher_temperature_longer_warmup_than_training_is_truncated():
    """The official code fails an assertion here; ours stops part-way up the same per-step ramp."""
    s = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=10, epochs=4, steps_per_epoch=2)
    assert len(s) == 8 and s[-1] == pytest.approx(0.04 + 7 * 0.03 / 19)
    np.testing.assert_array_equal(s, np.linspace(0.04, 0.07, 20)[:8])


def test_warmup_longer_than_schedule_is_an_error():
    with pytest.raises(ValueError, match="warmup"):
        cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=6)


def _official_steps_per_epoch(images_per_modality, world_size, batch_per_gpu):
    """datasets.py AllClassesImbalancedSampler.batches_per_epoch (what len(data_loader) returns)."""
    return sum(n // world_size for n in images_per_modality) // batch_per_gpu


@pytest.mark.parametrize("counts,world_size,batch_per_gpu", [
    ([471_428] * 6 + [471_432], 8, 128),  # the paper's 3.3M over 7 modalities, G = 1024
    ([471_428] * 6 + [471_432], 64, 16),
    ([1000, 37, 5, 999, 12, 300, 7], 4, 32),
    ([90, 10], 2, 64),  # N < G: the official sampler yields no batch, ours one step
])
def test_steps_per_epoch_is_ceil_of_images_over_global_batch_whatever_the_device_count(
        counts, world_size, batch_per_gpu):
    """A deliberate difference (derived.steps_per_epoch): ours does not depend on the GPU count and
    is 0 to 2 steps more than the official count (< 2 + M / batch_per_gpu in general)."""
    import ml_collections

    images, global_batch = sum(counts), world_size * batch_per_gpu
    config = ml_collections.ConfigDict({"num_train_images": images, "global_batch": global_batch})
    ours = derived.steps_per_epoch(config)
    assert ours == math.ceil(images / global_batch) >= 1
    official = _official_steps_per_epoch(counts, world_size, batch_per_gpu)
    assert 0 <= ours - official < 2 + len(counts) / batch_per_gpu
    if images == 3_300_000:
        assert (ours, official) == (3223, 3222)
