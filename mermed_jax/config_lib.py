"""Shared pieces of configs: the paper's recipe as a base, and `key=value` argument parsing.

Configs are code (configs/*.py); each starts from `paper_recipe()` and changes what it needs.
`get_config("variant=S/16,global_batch=256")`-style arguments override fields by dotted name or
by a short alias listed in ALIASES.
"""

import ast
import importlib.util
import math
import pathlib

import ml_collections
from ml_collections import config_dict

# Short names accepted in config arguments.
ALIASES = {
    "variant": "model.variant",
    "batch": "global_batch",
    "memory": "memory.size",
    "partition": "memory.partition_size",
    "shards": "memory.num_shards",
}


def paper_recipe() -> ml_collections.ConfigDict:
    """Every number of MerMED-FM's pretraining recipe (arXiv 2507.00185, MaSSL with gating)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.global_batch = 1024
    c.num_train_images = 3_300_000
    c.epochs = 100
    c.steps_per_epoch = config_dict.placeholder(int)  # None: ceil(num_train_images / global_batch)

    c.model = ml_collections.ConfigDict(dict(
        variant="B/16", img_size=224, drop_path_rate=0.1, num_registers=0,
        layerscale_init=config_dict.placeholder(float), dtype="bfloat16", remat_policy="none",
        scan_layers=False, pool="cls",
        width=config_dict.placeholder(int), depth=config_dict.placeholder(int),
        num_heads=config_dict.placeholder(int), mlp_dim=config_dict.placeholder(int),
    ))
    c.head = ml_collections.ConfigDict(dict(hidden_dim=2048, bottleneck_dim=256, num_layers=3, use_bn=True))
    # Multi-crop augmentation (data_pipelines.multicrop.MultiCropConfig's fields).
    c.crops = ml_collections.ConfigDict(dict(
        num_global=2, global_size=224, global_scale=(0.2, 1.0),
        num_local=10, local_size=96, local_scale=(0.05, 0.2), ratio=(3 / 4, 4 / 3),
        rotation=30.0, flip_prob=0.5, jitter_prob=0.8, brightness=0.2, contrast=0.2, saturation=0.1,
        hue=0.02, blur_sigma=(0.1, 1.0), global_blur_probs=(1.0, 0.1), local_blur_prob=0.5,
    ))
    c.memory = ml_collections.ConfigDict(dict(size=131_072, partition_size=16_384, num_shards=8))
    c.loss = ml_collections.ConfigDict(dict(
        student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=10,
        koleo_weight=0.0,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        base_lr=5e-5, min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4,
        layer_decay=0.8, clip_grad=1.0, b1=0.9, b2=0.999, eps=1e-8,
    ))
    c.ema = ml_collections.ConfigDict(dict(momentum=0.9995, momentum_end=1.0))
    # (data, fsdp, tensor) inside a granule (a TPU slice or GPU node; -1: auto), times dcn_shape
    # across granules (sharding.make_mesh); one process per GPU: processes_per_granule = GPUs/node.
    c.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1), dcn_shape=(1, 1, 1), granule="auto", processes_per_granule=1,
    ))
    # Input pipeline (data_pipelines.pipeline.TrainConfig's fields, batch and crops from above).
    c.data = ml_collections.ConfigDict(dict(
        dirs=(), split="train", mixture=config_dict.placeholder(dict), skip_corrupt=False,
        worker_count=0, read_threads=2, prefetch=2, cycle_length=16, shuffle_window=1024,
    ))
    # The job: how long, how often to log, save and profile, when to give up.
    c.grad_accum_steps = 1  # micro-batches per optimiser step (see train_step.make_train_step)
    c.max_steps = config_dict.placeholder(int)  # stop early (the schedules still span all epochs)
    c.log_every_steps = 50
    c.max_skipped_steps = 10  # consecutive non-finite updates before the job stops
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000, keep=3, keep_period=config_dict.placeholder(int), async_save=True,
    ))
    c.profile = ml_collections.ConfigDict(dict(every_steps=5000, num_steps=5))  # 0: never
    # Peak FLOP/s per device for MFU; None: from the device kind (mermed_jax.training.flops).
    c.peak_tflops_per_device = config_dict.placeholder(float)
    # The official code starts student and teacher from ImageNet DINO ViT-B/16.
    c.init_checkpoint = config_dict.placeholder(str)
    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills derived fields (steps_per_epoch)."""
    if config.get("steps_per_epoch") is None:
        config.steps_per_epoch = math.ceil(config.num_train_images / config.global_batch)
    return config


def apply_arguments(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies 'key=value,key=value' (values parsed as Python literals, else strings)."""
    if not arg:
        return config
    for item in arg.split(","):
        if "=" not in item:
            raise ValueError(f"config argument {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        path = ALIASES.get(key, key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            if p not in node:
                raise KeyError(f"config argument {key!r}: no config section {p!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config argument {key!r}: unknown key {path!r}")
        node[leaf] = value
    return config


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports a config file and calls its get_config(arg), as config_flags does for the CLIs."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"mermed_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
