"""What one training batch holds: the multi-crop settings and the batch layout they imply.

The layout (names, shapes, dtypes) is read by every stage that needs it: the pipeline fills
buffers of it, the train step compiles against it before any data arrives, and the networks are
initialised with a crop of it. Kept free of OpenCV, Grain and TensorFlow, so the train step's
import path (benchmarks on bare accelerator hosts) stays light.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

# Channels of every crop: shards store RGB (grey modalities repeated), so models see 3 channels.
CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Sizes, counts and strengths of the multi-crop augmentation (defaults: the paper's)."""

    global_size: int = 224
    num_global: int = 2
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_size: int = 96
    num_local: int = dataclasses.field(default=10, metadata={"ge": 0})
    local_scale: tuple[float, float] = (0.05, 0.2)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 30.0
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    # Blur probability of global crop k; crops past the tuple's end use its last value.
    global_blur_probs: tuple[float, ...] = (1.0, 0.1)
    local_blur_prob: float = 0.5

    def __post_init__(self):
        if self.global_size <= 0 or self.local_size <= 0:
            raise ValueError(f"crop sizes must be positive, got {self.global_size}, {self.local_size}")
        if self.num_global < 1 or self.num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {self.num_global}, {self.num_local}")
        if not self.global_blur_probs:
            raise ValueError("global_blur_probs must name at least one probability")

    def blur_prob(self, kind: str, index: int) -> float:
        if kind == "local":
            return self.local_blur_prob
        return self.global_blur_probs[min(index, len(self.global_blur_probs) - 1)]


class CropLayout(Protocol):
    """The crop counts and sizes: a MultiCropConfig or a config's `crops` section."""

    num_global: int
    global_size: int
    num_local: int
    local_size: int


def batch_layout(batch_size: int, crops: CropLayout) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a batch of `batch_size` images: uint8 crops, int32 modality ids.

    global    [B, num_global, G, G, 3]
    local     [B, num_local, L, L, 3]
    modality  [B]   (ids of data_pipelines.modalities)
    """
    return {
        "global": ((batch_size, crops.num_global, crops.global_size, crops.global_size, CHANNELS), np.dtype(np.uint8)),
        "local": ((batch_size, crops.num_local, crops.local_size, crops.local_size, CHANNELS), np.dtype(np.uint8)),
        "modality": ((batch_size,), np.dtype(np.int32)),
    }
