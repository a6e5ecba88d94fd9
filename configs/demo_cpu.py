r"""A tiny MerMED-FM for tests and the CPU demo: the paper's objective at toy scale.

ViT of width 64 and depth 2 on 4-px patches, 2 x 32 px global + 4 x 16 px local crops, batch 32,
memory of 1,024 (full, so modality gating switches on, after 32 steps) in blocks of 256.
A higher learning rate and a faster EMA suit a run of minutes.

Command (what `make demo` runs):
  python -m data_pipelines.convert demo --out demo_data --images-per-modality 512 --size 64
  python -m mermed_jax.pretrain --config=configs/demo_cpu.py --workdir=workdirs/demo
  python -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=workdirs/demo
  python -m mermed_jax.export --workdir=workdirs/demo --format=safetensors \
      --out=workdirs/demo/export/teacher.safetensors
Precision `mixed`, the fastest policy on a 2-core CPU (600 steps in 31 s, against 36 s in float32
and 39 s in bfloat16; BENCHMARKS.md: precision policies).

Expected: 600 steps in about a minute on a 2-core CPU, then linear-probe AUROC of the teacher
above the random network's on all seven modalities; measured 2026-11-30 (AMD EPYC, jax 0.12):
CT 0.906 vs 0.786, CXR 0.925 vs 0.839, US 0.936 vs 0.827, pathology 0.924 vs 0.873, CFP 0.961 vs
0.927, OCT 0.937 vs 0.896, derm 0.800 vs 0.766 (52 test images each; mean 0.913 vs 0.845, raw
pixels 0.769; in float32: mean 0.925).
"""

from data_pipelines.modalities import MODALITIES
from mermed_jax.recipe import arguments, schema


def get_config(arg: str | None = None):
    config = schema.paper_recipe()
    config.global_batch = 32
    config.num_train_images = 32 * 50
    config.epochs = 12
    config.model.update(dict(
        variant="Ti/4", img_size=32, width=64, depth=2, num_heads=2, mlp_dim=128,
        drop_path_rate=0.0,
    ))
    config.head.update(dict(hidden_dim=256, bottleneck_dim=64))
    config.crops.update(dict(global_size=32, num_local=4, local_size=16))
    config.memory.update(dict(size=1024, partition_size=256, num_shards=8))
    config.loss.update(dict(warmup_teacher_temp_epochs=1))
    config.optim.update(dict(base_lr=2e-2, warmup_epochs=1, layer_decay=1.0))
    config.ema.update(dict(momentum=0.9))  # cosine 0.9 -> 1: the teacher follows within a short run
    # `make demo` writes these with `python -m data_pipelines.convert demo --out demo_data`.
    config.data.dirs = tuple(f"demo_data/demo_{m}" for m in MODALITIES)
    config.pixel_stats.source = "measured"  # synthetic images: their own statistics, not the official ones
    config.log_every_steps = 25
    config.checkpoint.every_steps = 100
    config.profile.every_steps = 0
    return arguments.apply_arguments(config, arg)
