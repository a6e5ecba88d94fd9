r"""MerMED-FM pretraining: ViT-B/16, MaSSL with modality gating (arXiv 2507.00185).

2 x 224 + 10 x 96 crops, global batch 1024 balanced over 7 modalities, memory of 131,072 teacher
embeddings in blocks of 16,384, AdamW (base LR 5e-5 x batch/256, layer decay 0.8, WD 0.04 -> 0.4),
EMA momentum 0.9995 -> 1, 100-epoch schedules over ~3.3M images (3,223 steps per epoch); the paper
releases the teacher at epoch 50. Student and teacher start from ImageNet DINO ViT-B/16.
Precision `mixed` (the schema's default): bf16 matmul operands with fp32 accumulation, fp32
everywhere else, as PyTorch's bf16 autocast and big_vision's ViTs on TPU (README: Precision).

Command:
  python -m mermed_jax.pretrain --config=configs/mermed_vitb16.py --workdir=gs://bucket/mermed_b16
  (arguments: --config=configs/mermed_vitb16.py:variant=S/16,batch=512)

Expected cost: about 472 GFLOP per image (student fwd+bwd on 12 crops, teacher fwd on 2), so
1.6e20 FLOP for 100 epochs (0.8e20 to the released epoch 50): roughly 14 hours on 8 H100s, or
1.7 hours on 64, at 40% MFU. Downstream (paper): fine-tuned AUROC 0.86 (CXR) to 0.99 (OCT).
"""

from mermed_jax.recipe import arguments, schema


def get_config(arg: str | None = None):
    config = schema.paper_recipe()
    config.num_train_images = 3_300_000  # the paper's corpus; unset, it is counted from data.dirs
    config.init_checkpoint = "dino_vitbase16_pretrain.pth"
    return arguments.apply_arguments(config, arg)
