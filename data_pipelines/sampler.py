"""Modality-balanced batch composition and the per-modality infinite record streams.

Both are pure functions of (seed, host, step), with no iteration state, so any training step's
batch can be computed directly: that is what makes a restored pipeline continue exactly and lets
Grain spread steps over worker processes without changing their content.

Balance. The official MaSSL sampler gives every per-device batch b // M images of each of the M
modalities and the remainder always to the same two. Here the remainder slots follow a fixed
cyclic pattern over modalities that every device batch of the whole pod consumes in turn
(device batch g = (step * hosts + host) * devices + device takes remainder slots
[g * r, (g + 1) * r)), so the extra images rotate fairly over modalities across devices, hosts
and steps. When b < M the same rotation keeps each host batch (and the global batch) balanced to
within one image per modality. Mixture weights replace equal shares: each device batch gets
floor(b * w_m) of modality m, and the fractional parts decide the pattern's frequencies.

Streams. Each modality is an infinite stream of this host's records, reshuffled every pass: the
host's files (or record-level chunks) in a new random order, interleaved `cycle_length` at a time
(round robin, as tf.data's interleave reads), then shuffled inside windows of `shuffle_window`.
Small modalities simply run through more passes.
"""
from __future__ import annotations

import math

import numpy as np

from data_pipelines.multicrop import keyed_rng

# Length of the cyclic remainder pattern; divisible by 1..8, so equal weights over up to eight
# modalities give an exact rotation.
PATTERN_LENGTH = 840
_STREAM_KEY = 1  # key namespace of stream shuffles (augmentation keys use other namespaces)


def _smooth_round_robin(quota: np.ndarray) -> np.ndarray:
    """A sequence of sum(quota) indices with index i appearing quota[i] times, evenly spread.

    Nginx's smooth weighted round robin: equal quotas give 0, 1, ..., M-1, 0, 1, ...
    """
    total = int(quota.sum())
    current = np.zeros(len(quota), np.int64)
    out = np.empty(total, np.int64)
    for k in range(total):
        current += quota
        pick = int(np.argmax(current))
        current[pick] -= total
        out[k] = pick
    return out


class BalancedAllocator:
    """How many images of each modality every per-device batch of a host step holds.

    `weights` holds one non-negative weight per active modality (positions, not modality ids).
    """

    def __init__(self, per_device_batch: int, local_devices: int, process_index: int,
                 process_count: int, weights: np.ndarray):
        weights = np.asarray(weights, np.float64)
        if per_device_batch < 1 or local_devices < 1:
            raise ValueError(f"need per_device_batch >= 1 and local_devices >= 1, "
                             f"got {per_device_batch}, {local_devices}")
        if weights.ndim != 1 or len(weights) == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {weights}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.local_devices = local_devices
        self.num_modalities = len(weights)
        share = per_device_batch * weights / weights.sum()
        # The epsilon keeps float error (2.9999999999999996) from losing a whole image.
        self.base = np.floor(share + 1e-9).astype(np.int64)
        if self.base.sum() > per_device_batch:
            self.base = np.floor(share).astype(np.int64)
        self.remainder = per_device_batch - int(self.base.sum())
        frac = np.clip(share - self.base, 0.0, None)
        if self.remainder:
            quota = _largest_remainder(frac / frac.sum() * PATTERN_LENGTH, PATTERN_LENGTH)
            self.pattern = _smooth_round_robin(quota)
        else:
            self.pattern = np.zeros(0, np.int64)
        # Device batch g of the pod is ((step * process_count + process_index) * local_devices + d).
        self._first_device = process_index * local_devices
        self._devices_per_step = process_count * local_devices
        slots_per_step = self._devices_per_step * self.remainder
        self.period = PATTERN_LENGTH // math.gcd(PATTERN_LENGTH, slots_per_step) if self.remainder else 1
        self._per_step = np.stack([self._counts_direct(t) for t in range(self.period)])  # [period, D, M]
        self._cum = np.concatenate([np.zeros((1, self.num_modalities), np.int64),
                                    np.cumsum(self._per_step.sum(axis=1), axis=0)])  # [period + 1, M]

    def _counts_direct(self, step: int) -> np.ndarray:
        counts = np.tile(self.base, (self.local_devices, 1))
        if self.remainder:
            for d in range(self.local_devices):
                g = step * self._devices_per_step + self._first_device + d
                slots = (g * self.remainder + np.arange(self.remainder)) % PATTERN_LENGTH
                counts[d] += np.bincount(self.pattern[slots], minlength=self.num_modalities)
        return counts

    def device_counts(self, step: int) -> np.ndarray:
        """int64 [local_devices, M]: images per modality in each per-device batch of `step`."""
        return self._per_step[step % self.period]

    def stream_start(self, step: int) -> np.ndarray:
        """int64 [M]: how many images of each modality this host used before `step`."""
        cycles, rest = divmod(step, self.period)
        return cycles * self._cum[-1] + self._cum[rest]


def _largest_remainder(target: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each the floor or ceiling of `target` (Hamilton's method)."""
    quota = np.floor(target).astype(np.int64)
    short = total - int(quota.sum())
    quota[np.argsort(-(target - quota), kind="stable")[:short]] += 1
    return quota


def epoch_order(unit_starts: np.ndarray, seed: int, modality: int, process_index: int, epoch: int,
                cycle_length: int, shuffle_window: int) -> np.ndarray:
    """Permutation of a host's records of one modality for one pass over them.

    `unit_starts` (int64 [U + 1]) delimits the units (files, or record-level chunks) as runs of
    record indices. Vectorised: O(N log N) numpy per pass, no Python loop over records.
    """
    rng = keyed_rng((seed, _STREAM_KEY, modality, process_index, epoch))
    sizes = np.diff(unit_starts)
    num_units = len(sizes)
    rank = np.empty(num_units, np.int64)
    rank[rng.permutation(num_units)] = np.arange(num_units)  # unit u is read rank[u]-th
    unit_of = np.repeat(np.arange(num_units), sizes)
    within = np.arange(unit_starts[-1]) - unit_starts[unit_of]
    group, lane = np.divmod(rank[unit_of], max(1, cycle_length))
    order = np.lexsort((lane, within, group))  # groups in turn; inside one, round robin by record
    if shuffle_window > 1:
        window = np.arange(len(order)) // shuffle_window
        order = order[np.lexsort((rng.random(len(order)), window))]
    return order
