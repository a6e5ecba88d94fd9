"""The training pipeline's settings, apart from the pipeline itself.

Kept free of Grain, OpenCV and TensorFlow: the recipe schema (mermed_jax.recipe) reads the
`data` section's defaults from this dataclass, and the train step's import path must stay light.
Field meanings: data_pipelines/pipeline.py's docstring.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from data_pipelines.batch_spec import MultiCropConfig

# Fields that the job's config keeps outside its `data` section (top-level batch, seed, crops).
FROM_OUTSIDE_DATA_SECTION = ("per_device_batch", "global_batch", "crops", "seed")


# data.mixture value for the data's own modality shares (record counts) instead of balanced batches.
NATURAL_MIXTURE = "natural"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training-pipeline settings; see the module docstring for each field."""

    dirs: tuple[str, ...]
    split: str = "train"
    per_device_batch: int | None = None
    global_batch: int | None = None
    crops: MultiCropConfig = MultiCropConfig()
    seed: int = 0
    mixture: Mapping[str, float] | str | None = None  # None: balanced; NATURAL_MIXTURE; or weights
    skip_corrupt: bool = False
    worker_count: int = dataclasses.field(default=0, metadata={"ge": 0})
    read_threads: int = 2
    prefetch: int = 2
    cycle_length: int = 16
    shuffle_window: int = 1024

    def __post_init__(self):
        if (self.per_device_batch is None) == (self.global_batch is None):
            raise ValueError("set exactly one of per_device_batch and global_batch")
        if not self.dirs:
            raise ValueError("dirs names no dataset directory")
        if isinstance(self.mixture, str) and self.mixture != NATURAL_MIXTURE:
            raise ValueError(f"data.mixture={self.mixture!r}: expected {NATURAL_MIXTURE!r}, None (balanced) or "
                             "{modality: weight}")

    @classmethod
    def from_config(cls, section: Any, **overrides: Any) -> TrainConfig:
        """From an ml_collections ConfigDict (or a mapping) whose keys are this class's fields.

        `overrides` adds or replaces fields, e.g. the config's top-level batch and crops:
        TrainConfig.from_config(config.data, global_batch=config.global_batch, crops=config.crops).
        """
        values = {**_plain(section), **{k: _plain(v) for k, v in overrides.items()}}
        return cls(**_fields(cls, values, "data"))

    def device_batch(self) -> int:
        if self.per_device_batch is not None:
            return self.per_device_batch
        if self.global_batch % jax.device_count():
            raise ValueError(f"global_batch {self.global_batch} is not divisible by {jax.device_count()} devices")
        return self.global_batch // jax.device_count()


def _plain(value: Any) -> Any:
    """ConfigDicts (which carry their own locking and typing) as plain dicts; other values as is."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def _fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Checks keys against the dataclass fields and turns lists into tuples (configs hold lists)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config.{where}: unknown keys {unknown}; known: {sorted(names)}")
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if "crops" in out and not isinstance(out["crops"], MultiCropConfig):
        out["crops"] = MultiCropConfig(**_fields(MultiCropConfig, dict(out["crops"]), f"{where}.crops"))
    return out
