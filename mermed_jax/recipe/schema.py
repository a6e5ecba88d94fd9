"""The pretraining recipe's schema: every config key, its type, its default and its bounds, once.

A section is a frozen dataclass; a field's annotation is its type, its default is the paper's
value, and its metadata holds the bounds that `validation.py` enforces (`gt`, `ge`, `lt`, `le`,
`choices`, `check`, `why`). Three sections are the dataclasses that the stages build from a
config (HeadConfig, MultiCropConfig, data_pipelines' TrainConfig): their defaults are read from
there, so no number is written twice. `paper_recipe()` renders the schema as the ConfigDict that
configs/*.py start from.

Derived values (steps per epoch and what follows from it) are deliberately not keys: they are
computed where used (`derived.py`), so a `--config.global_batch=...` override cannot leave them
stale. `precision` names a policy of models/precision.py: it covers the backbone, the head and the
memory similarities, so it is a top-level key rather than one of the model's.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from data_pipelines import normalization
from data_pipelines.batch_spec import MultiCropConfig
from data_pipelines.train_config import FROM_OUTSIDE_DATA_SECTION, TrainConfig
from mermed_jax.models.head import HeadConfig
from mermed_jax.models.precision import PRECISIONS
from mermed_jax.models.vit import REMAT_POLICIES, ViTConfig, parse_variant
from mermed_jax.sharding import GRANULES

POOLS = ("cls", "patch_mean")


def key(default: Any, **bounds: Any) -> Any:
    """A schema field: its default and its bounds (gt, ge, lt, le, choices, check, why)."""
    if isinstance(default, (list, dict)):
        raise TypeError("defaults must be immutable (use tuples)")
    return dataclasses.field(default=default, metadata=bounds)


def _module_default(cls: type, name: str) -> Any:
    """The default a component dataclass gives its field: the schema takes it from there."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _check_variant(value: str) -> None:
    parse_variant(value)


@dataclasses.dataclass(frozen=True)
class Model:
    """The backbone. width/depth/num_heads/mlp_dim override the variant's when set."""

    variant: str = key("B/16", check=_check_variant)
    img_size: int = key(_module_default(ViTConfig, "img_size"))
    drop_path_rate: float = key(0.1, ge=0.0, lt=1.0)
    num_registers: int = key(_module_default(ViTConfig, "num_registers"), ge=0)
    layerscale_init: float | None = key(_module_default(ViTConfig, "layerscale_init"))
    remat_policy: str = key(_module_default(ViTConfig, "remat_policy"), choices=tuple(REMAT_POLICIES))
    scan_layers: bool = key(_module_default(ViTConfig, "scan_layers"))
    pool: str = key("cls", choices=POOLS)
    width: int | None = key(None)
    depth: int | None = key(None)
    num_heads: int | None = key(None)
    mlp_dim: int | None = key(None)


@dataclasses.dataclass(frozen=True)
class Memory:
    """The FIFO memory of teacher embeddings, in num_shards logical shards, compared in blocks."""

    size: int = key(131_072)
    partition_size: int = key(16_384)
    num_shards: int = key(8)


@dataclasses.dataclass(frozen=True)
class Loss:
    student_temp: float = key(0.1, gt=0.0)
    teacher_temp: float = key(0.07, gt=0.0)
    warmup_teacher_temp: float = key(0.04, gt=0.0)
    warmup_teacher_temp_epochs: int = key(10, ge=0)
    koleo_weight: float = key(0.0, ge=0.0)
    # Mask other modalities' memory entries once the memory is full; False is plain MaSSL (an ablation).
    modality_gating: bool = key(True)


@dataclasses.dataclass(frozen=True)
class Optim:
    """AdamW; the peak LR is base_lr x global_batch / 256."""

    base_lr: float = key(5e-5, gt=0.0)
    min_lr: float = key(1e-6, ge=0.0)
    warmup_epochs: int = key(10, ge=0)
    weight_decay: float = key(0.04, ge=0.0)
    weight_decay_end: float = key(0.4, ge=0.0)
    layer_decay: float = key(0.8, gt=0.0, le=1.0)
    clip_grad: float = key(1.0, gt=0.0)
    b1: float = key(0.9, ge=0.0, lt=1.0)
    b2: float = key(0.999, ge=0.0, lt=1.0)
    eps: float = key(1e-8, gt=0.0)


@dataclasses.dataclass(frozen=True)
class Ema:
    """Teacher momentum, cosine from `momentum` to `momentum_end`."""

    momentum: float = key(0.9995, ge=0.0, le=1.0)
    momentum_end: float = key(1.0, ge=0.0, le=1.0)


@dataclasses.dataclass(frozen=True)
class Mesh:
    """(data, fsdp, tensor) inside a granule (a TPU slice or GPU node; -1: auto), times dcn_shape
    across granules (sharding.make_mesh); one process per GPU: processes_per_granule = GPUs/node."""

    shape: tuple[int, int, int] = key((-1, 1, 1), any_int=True)
    dcn_shape: tuple[int, int, int] = key((1, 1, 1), any_int=True)
    granule: str = key("auto", choices=GRANULES)
    processes_per_granule: int = key(1)


def _check_given_stats(value: Mapping) -> None:
    mean, std = normalization.table("official")
    normalization.with_given(mean, std, {name: tuple(pair) for name, pair in value.items()})


@dataclasses.dataclass(frozen=True)
class PixelStats:
    """The per-modality mean/std the network's inputs are normalised with: the official MerMED-FM
    constants, `measured` on the shards of data.dirs, or ImageNet's; `given` ({modality: (mean,
    std)}, 1 or 3 values each) replaces rows. Saved with the run at its first start (run.json);
    resume, evaluation and export read them from there."""

    source: str = key("official", choices=normalization.SOURCES)
    given: Mapping[str, Any] | None = key(None, check=_check_given_stats)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    every_steps: int = key(1000)
    keep: int = key(3)
    keep_period: int | None = key(None)
    async_save: bool = key(True)


@dataclasses.dataclass(frozen=True)
class Profile:
    every_steps: int = key(5000, ge=0)  # 0: never
    num_steps: int = key(5)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The top level: the job's length, batch and cadence, and one field per section.

    Section fields hold the section's class: `head`, `crops` and `data` are the component
    dataclasses whose defaults are the recipe's (`data` without the keys kept at the top level).
    """

    seed: int = key(0, any_int=True)
    global_batch: int = key(1024)
    # Images per epoch; None: the record count of data.split over data.dirs (logged at the start).
    num_train_images: int | None = key(None)
    epochs: int = key(100)
    grad_accum_steps: int = key(1)  # micro-batches per optimiser step (train_step.make_train_step)
    max_steps: int | None = key(None, ge=0)  # stop early (the schedules still span all epochs)
    log_every_steps: int = key(50)
    # How often logged metrics reach the workdir (metric_writers: whole part objects, which an object
    # store needs); a crash loses at most this many seconds of them. 0: at every logged step.
    log_flush_seconds: float = key(60.0, ge=0.0)
    # The precision policy (models/precision.py); "mixed" is PyTorch's bf16 autocast.
    precision: str = key(_module_default(ViTConfig, "precision"), choices=PRECISIONS)
    max_skipped_steps: int = key(10)  # consecutive non-finite updates before the job stops
    # Peak FLOP/s per device for MFU; None: from the device kind (training/flops.py).
    peak_tflops_per_device: float | None = key(None, gt=0.0)
    # The official code starts student and teacher from ImageNet DINO ViT-B/16.
    init_checkpoint: str | None = key(None)
    model: type = key(Model)
    head: type = key(HeadConfig)
    crops: type = key(MultiCropConfig)
    memory: type = key(Memory)
    loss: type = key(Loss)
    optim: type = key(Optim)
    ema: type = key(Ema)
    mesh: type = key(Mesh)
    data: type = key(TrainConfig)
    pixel_stats: type = key(PixelStats)
    checkpoint: type = key(Checkpoint)
    profile: type = key(Profile)


# Bounds the recipe adds to component dataclasses' fields (keys of the ConfigDict).
EXTRA_BOUNDS: dict[str, dict[str, Any]] = {
    "crops.num_global": {"ge": 2, "why": "MaSSL needs at least 2 global crops"},
}
# Keys of the data section: TrainConfig's fields but those the config keeps elsewhere.
DATA_DEFAULTS: dict[str, Any] = {"dirs": ()}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One key of the schema: where it lives, its declared type, default and bounds."""

    path: str
    annotation: Any
    default: Any
    bounds: Mapping[str, Any]


def sections() -> dict[str, type]:
    """{section name: its dataclass}, in the recipe's order."""
    return {f.name: f.default for f in dataclasses.fields(Recipe) if isinstance(f.default, type)}


def _fields_of(cls: type, prefix: str) -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if cls is TrainConfig and f.name in FROM_OUTSIDE_DATA_SECTION:
            continue
        if isinstance(f.default, type):
            continue
        path = f"{prefix}{f.name}"
        default = DATA_DEFAULTS[f.name] if cls is TrainConfig and f.name in DATA_DEFAULTS else f.default
        if default is dataclasses.MISSING:
            raise TypeError(f"{path}: the schema needs a default (add it to DATA_DEFAULTS or the dataclass)")
        out.append(Leaf(path, hints[f.name], default, {**f.metadata, **EXTRA_BOUNDS.get(path, {})}))
    return out


def leaves() -> dict[str, Leaf]:
    """Every key of the recipe by its dotted path, e.g. 'optim.base_lr'."""
    out = {leaf.path: leaf for leaf in _fields_of(Recipe, "")}
    for name, cls in sections().items():
        out.update({leaf.path: leaf for leaf in _fields_of(cls, f"{name}.")})
    return out


def paper_recipe() -> ml_collections.ConfigDict:
    """Every number of MerMED-FM's pretraining recipe (arXiv 2507.00185, MaSSL with gating)."""
    config = ml_collections.ConfigDict()
    for path, leaf in leaves().items():
        *parents, name = path.split(".")
        node = config
        for parent in parents:
            if parent not in node:
                node[parent] = ml_collections.ConfigDict()
            node = node[parent]
        node[name] = _config_value(leaf)
    return config


def _config_value(leaf: Leaf) -> Any:
    """A default as a ConfigDict value; a None default becomes a typed placeholder, so a config
    file or flag can set it later (ml_collections refuses to change a None field's type)."""
    if leaf.default is not None:
        return leaf.default
    optional = [t for t in getattr(leaf.annotation, "__args__", ()) if t is not type(None)]
    kind = optional[0] if len(optional) == 1 else object  # several types (a mapping or a name): any
    kind = dict if getattr(kind, "__origin__", kind) in (Mapping, dict) else getattr(kind, "__origin__", kind)
    return ml_collections.config_dict.placeholder(kind)
