"""Per-step schedules, precomputed on the host with the official (DINO) code's semantics.

DINO's `cosine_scheduler` warms up with `np.linspace(start, base, warmup_iters)` (so step 0 has
value `start`, 0 for the learning rate) and then follows a half cosine from base to final over the
remaining steps; optax's warmup_cosine_decay_schedule is one step off from that. The teacher
temperature is a *step* schedule in MerMED-FM (main_mermed.py builds it with the same
cosine_scheduler, base = final = teacher_temp, warmup_epochs x steps_per_epoch linear warmup
steps), not DINO's per-epoch one. The host indexes these arrays and hands the step's values to the
jitted step, which keeps schedules out of the compiled program.
"""

import dataclasses

import numpy as np

from mermed_jax.recipe import derived


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """DINO's cosine_scheduler, in steps."""
    if warmup_steps > total_steps:
        raise ValueError(f"warmup ({warmup_steps} steps) is longer than the schedule ({total_steps} steps)")
    warmup = np.linspace(warmup_start, base, warmup_steps) if warmup_steps > 0 else np.zeros((0,))
    iters = np.arange(total_steps - warmup_steps)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate([warmup, decay])


def teacher_temperature_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, steps_per_epoch: int
) -> np.ndarray:
    """MerMED-FM's teacher temperature, one value per step: linear from warmup_temp to temp over
    the first warmup_epochs x steps_per_epoch steps (np.linspace, so the last warmup step is
    exactly temp), then constant.

    This is cosine_schedule(temp, temp, ...) with warmup, as the official main_mermed.py builds
    it, except that a warmup longer than the run is cut at the run's last step (the official
    code fails an assertion there): a short run then ends part-way up the same ramp.
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    if warmup_steps > total:
        return np.linspace(warmup_temp, temp, warmup_steps)[:total]
    return cosine_schedule(temp, temp, total, warmup_steps, warmup_start=warmup_temp)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """One value per optimiser step for everything that changes during training."""

    learning_rate: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def __len__(self) -> int:
        return len(self.learning_rate)

    def at(self, step: int) -> dict[str, np.float32]:
        """The step's values, as float32 scalars for the jitted step (clamped past the end)."""
        i = min(int(step), len(self) - 1)
        return {
            "learning_rate": np.float32(self.learning_rate[i]),
            "weight_decay": np.float32(self.weight_decay[i]),
            "momentum": np.float32(self.momentum[i]),
            "teacher_temp": np.float32(self.teacher_temp[i]),
        }


def build_schedules(config, steps_per_epoch: int | None = None) -> Schedules:
    """Schedules from the epoch-based config (see configs/mermed_vitb16.py for the fields).

    steps_per_epoch: the run's saved value (training/run_record.py); None derives it.
    """
    steps_per_epoch = derived.steps_per_epoch(config) if steps_per_epoch is None else steps_per_epoch
    total = derived.total_steps(config, steps_per_epoch)
    opt = config.optim
    peak_lr = opt.base_lr * config.global_batch / 256.0
    return Schedules(
        learning_rate=cosine_schedule(peak_lr, opt.min_lr, total, opt.warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(opt.weight_decay, opt.weight_decay_end, total),
        momentum=cosine_schedule(config.ema.momentum, config.ema.momentum_end, total),
        teacher_temp=teacher_temperature_schedule(
            config.loss.warmup_teacher_temp, config.loss.teacher_temp,
            config.loss.warmup_teacher_temp_epochs, config.epochs, steps_per_epoch,
        ),
    )
