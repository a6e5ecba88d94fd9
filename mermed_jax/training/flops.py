"""FLOP counting and MFU (the writers are in metric_writers.py).

Free of clu and tensorflow, so benchmarks can import it on machines without them. FLOPs are
counted analytically as model FLOPs (matmuls of the forward pass, x3 for
forward + backward of the student; rematerialisation not counted, as MFU conventionally does)
and cross-checked against XLA's cost analysis by bench/train_step.py.
"""

import jax
import ml_collections

from mermed_jax.models.vit import ViTConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' datasheets.
PEAK_FLOPS_BY_DEVICE_KIND: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def vit_forward_flops(cfg: ViTConfig, crop_size: int) -> float:
    """Matmul FLOPs of one image through the backbone (2 per multiply-add)."""
    patches = (crop_size // cfg.patch_size) ** 2
    tokens = patches + 1 + cfg.num_registers
    d = cfg.width
    per_block = 2 * tokens * (3 * d * d + d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * tokens * tokens * d
    return 2 * patches * cfg.patch_size**2 * 3 * d + cfg.depth * per_block


def head_forward_flops(width: int, hidden: int, bottleneck: int, num_layers: int) -> float:
    return 2 * (width * hidden + max(num_layers - 2, 0) * hidden * hidden + hidden * bottleneck)


def step_flops(config: ml_collections.ConfigDict, backbone: ViTConfig) -> dict[str, float]:
    """Model FLOPs of one train step over the global batch, by part."""
    c, b = config.crops, config.global_batch
    head = head_forward_flops(backbone.width, config.head.hidden_dim, config.head.bottleneck_dim, config.head.num_layers)
    global_fwd = vit_forward_flops(backbone, c.global_size) + head
    local_fwd = vit_forward_flops(backbone, c.local_size) + head
    student_fwd = b * (c.num_global * global_fwd + c.num_local * local_fwd)
    n_student = c.num_global + c.num_local
    logits = 2 * config.memory.size * config.head.bottleneck_dim * b
    return {
        "student_forward_backward": 3 * student_fwd,
        "teacher_forward": b * c.num_global * global_fwd,
        "memory_loss": logits * (3 * n_student + c.num_global),
    }


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float | None:
    """From the config, else from the device kind; None when unknown (MFU is then not logged)."""
    if config.get("peak_tflops_per_device"):
        return config.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if kind.startswith(name):
            return peak
    return None


def throughput_metrics(flops_per_step: float, seconds_per_step: float, images_per_step: int,
                       peak_per_device: float | None) -> dict[str, float]:
    achieved = flops_per_step / seconds_per_step
    out = {
        "perf/images_per_sec": images_per_step / seconds_per_step,
        "perf/tflops_per_sec_per_device": achieved / jax.device_count() / 1e12,
    }
    if peak_per_device:
        out["perf/mfu"] = achieved / (peak_per_device * jax.device_count())
    return out
