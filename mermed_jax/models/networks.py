"""The student and teacher networks a config describes: one factory for training, evaluation,
export and import, so that every stage builds the same architecture from the same keys."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from data_pipelines.batch_spec import batch_layout
from mermed_jax.models.head import HeadConfig, MultiCropNetwork
from mermed_jax.models.vit import ViTConfig

PyTree = Any


def backbone_config(config: ml_collections.ConfigDict, *, teacher: bool) -> ViTConfig:
    m = config.model
    return ViTConfig.from_variant(
        m.variant,
        width=m.get("width"), depth=m.get("depth"), num_heads=m.get("num_heads"), mlp_dim=m.get("mlp_dim"),
        img_size=m.img_size, num_registers=m.num_registers, layerscale_init=m.layerscale_init,
        drop_path_rate=0.0 if teacher else m.drop_path_rate,
        precision=config.precision, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
    )


def build_networks(config: ml_collections.ConfigDict) -> tuple[MultiCropNetwork, MultiCropNetwork]:
    """Student and teacher: the same architecture; the teacher has no stochastic depth."""
    head = HeadConfig(**config.head.to_dict())
    student = MultiCropNetwork(backbone_config(config, teacher=False), head, pool=config.model.pool)
    teacher = MultiCropNetwork(backbone_config(config, teacher=True), head, pool=config.model.pool)
    return student, teacher


def dummy_crops(config: ml_collections.ConfigDict) -> list[jnp.ndarray]:
    """One image's global crops (data_pipelines.batch_spec's layout), to initialise the networks."""
    shape, _ = batch_layout(1, config.crops)["global"]
    return [jnp.zeros(shape, jnp.float32)]


def abstract_params(config: ml_collections.ConfigDict) -> PyTree:
    """Unboxed parameter shapes, for building the optimiser without allocating anything."""
    student, _ = build_networks(config)
    variables = jax.eval_shape(
        lambda: student.init({"params": jax.random.key(0)}, dummy_crops(config), train=False)
    )
    return nn.unbox(variables["params"])
