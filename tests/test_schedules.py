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
    # teacher temperature: DINO's per-epoch linspace 0.04 -> 0.07 over 10 epochs, then constant
    assert sched.teacher_temp[0] == pytest.approx(0.04)
    assert sched.teacher_temp[n - 1] == pytest.approx(0.04)
    assert sched.teacher_temp[n] == pytest.approx(0.04 + 0.03 / 9)
    assert sched.teacher_temp[9 * n] == pytest.approx(0.07)
    assert sched.teacher_temp[-1] == pytest.approx(0.07)
    values = sched.at(10 * n - 1)
    assert values["learning_rate"] == np.float32(peak)
    assert sched.at(10**9)["learning_rate"] == np.float32(sched.learning_rate[-1])


def test_teacher_temperature_longer_warmup_than_training_is_truncated():
    s = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=10, epochs=4, steps_per_epoch=2)
    assert len(s) == 8 and s[-1] == pytest.approx(0.04 + 3 * 0.03 / 9)


def test_warmup_longer_than_schedule_is_an_error():
    with pytest.raises(ValueError, match="warmup"):
        cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=6)
