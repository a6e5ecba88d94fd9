"""The "finetune" protocol: full fine-tuning in JAX, after the official recipe (MAE/BEiT-style, as
MerMED-FM's code runs it).

The pretrained final norm is dropped: a new LayerNorm goes on the average-pooled patch tokens taken
before it (ViT's `patch_mean_prenorm`), then a linear head initialised with std 2e-5. AdamW with
base LR 5e-3 scaled by batch/256, layer decay 0.65 (MAE convention: the head and new norm scale 1,
block k scales decay^(depth - k), the stem decay^(depth + 1)), weight decay 0.05 on matrices only,
drop path 0.2, label smoothing 0.1 (multiclass; multi-label sets use per-label sigmoid and BCE),
warmup then cosine per step, test metrics after the last epoch. Differences from the official code:
no mixup/cutmix, the RandAugment-like policy of eval/finetune_augment.py, no gradient clipping (the
official default) and images held in host memory (fine for the evaluation sets this is meant for).
Rows run on the images of `image_splits`, one per seed (training is seeded) on patch_mean_prenorm.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines.modalities import modality_id
from data_pipelines.multicrop import center_crop
from mermed_jax import sharding
from mermed_jax.eval import finetune_augment, protocols
from mermed_jax.eval.encoders import PIXELS, RANDOM, Encoder
from mermed_jax.eval.features import FeatureSet, load_images
from mermed_jax.eval.inputs import Dataset, pipeline_config, three_splits
from mermed_jax.models.vit import LN_EPS, ViT, ViTConfig
from mermed_jax.preprocess import normalize_images
from mermed_jax.ssl.schedules import cosine_schedule
from mermed_jax.training import optim

HEAD_INIT_STD = 2e-5


class FineTuneNet(nn.Module):
    backbone: ViTConfig
    num_classes: int

    @nn.compact
    def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        pooled = ViT(self.backbone, name="backbone")(images, train=train)["patch_mean_prenorm"]
        pooled = nn.LayerNorm(epsilon=LN_EPS, name="fc_norm")(pooled)
        return nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.truncated_normal(HEAD_INIT_STD))(pooled)


def layer_decay_scales(params, depth: int, decay: float):
    """MAE's layer-wise LR scales: decay ** (depth + 1 - layer id), head and fc_norm at id depth + 1."""
    def scale(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        lid = depth + 1 if names[0] != "backbone" or names[1] == "norm" else optim.layer_id(names, depth)
        value = np.asarray(decay, np.float64) ** (depth + 1 - np.asarray(lid))
        return value.reshape((-1,) + (1,) * (np.ndim(leaf) - 1)).astype(np.float32) if value.ndim else np.float32(value)

    return jax.tree_util.tree_map_with_path(scale, params)


@dataclasses.dataclass(frozen=True)
class FineTuneResult:
    test_scores: np.ndarray
    losses: np.ndarray  # training loss per step


def _loss(logits: jnp.ndarray, labels: jnp.ndarray, task: str, smoothing: float) -> jnp.ndarray:
    if task == "multilabel":
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def finetune(cfg: ml_collections.ConfigDict, encoder: Encoder, task: str, num_classes: int, modality: int,
             train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
             mesh: jax.sharding.Mesh, seed: int) -> FineTuneResult:
    """Fine-tunes `encoder` (random-init encoders train from scratch) and scores the test images.

    train_images: uint8 [N, L, L, 3] at the resize resolution (random crops of cfg.image_size come
    from them); test_images: uint8 [M, S, S, 3], already centre-cropped to cfg.image_size.
    """
    vit = dataclasses.replace(encoder.config, drop_path_rate=cfg.drop_path)  # the eval config's precision (evaluate.py)
    model = FineTuneNet(vit, num_classes)
    devices = sharding.num_batch_shards(mesh)
    batch = min(cfg.batch_size, len(train_images)) // devices * devices
    if batch == 0:
        raise ValueError(f"finetune: {len(train_images)} training images cannot fill one batch on {devices} devices")
    steps_per_epoch = len(train_images) // batch
    total = cfg.epochs * steps_per_epoch
    lr = cosine_schedule(cfg.base_lr * batch / 256, cfg.min_lr, total, cfg.warmup_epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    rng = jax.random.key(seed)
    init_rng, data_rng, step_rng = jax.random.split(rng, 3)
    size = cfg.image_size
    params = nn.unbox(model.init(init_rng, jnp.zeros((1, size, size, 3)), train=False)["params"])
    if encoder.kind != RANDOM:
        params = dict(params, backbone=encoder.params)
    decay_scales = layer_decay_scales(params, vit.depth, cfg.layer_decay)
    tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optim.scale_by_layerwise_lr_and_decoupled_wd(decay_scales, optim.weight_decay_mask(params)))
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params = jax.device_put(params, repl)
    opt_state = jax.device_put(tx.init(params), repl)
    mean, std = jnp.asarray(encoder.pixel_mean), jnp.asarray(encoder.pixel_std)
    modality_mean, modality_std = mean[modality], std[modality]

    @functools.partial(jax.jit, in_shardings=(repl, repl, data, data, repl, None), out_shardings=(repl, repl, repl),
                       donate_argnums=(0, 1))
    def train_step(params, opt_state, images, labels, key, learning_rate):
        aug_keys = jax.random.split(jax.random.fold_in(key, 0), images.shape[0])
        views = jax.vmap(lambda k, im: finetune_augment.train_view(k, im, size, modality_mean, modality_std, cfg.erase_prob,
                                            cfg.randaug_ops, cfg.randaug_magnitude))(
            aug_keys, images)

        def loss_fn(p):
            logits = model.apply({"params": p}, views, train=True, rngs={"dropout": jax.random.fold_in(key, 1)})
            return _loss(logits, labels, task, cfg.label_smoothing)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, learning_rate=learning_rate,
                                       weight_decay=cfg.weight_decay)
        return optax.apply_updates(params, updates), opt_state, loss

    @functools.partial(jax.jit, in_shardings=(repl, data), out_shardings=data)
    def predict(params, images):
        x = normalize_images(images, jnp.full(images.shape[:1], modality), mean, std)
        logits = model.apply({"params": params}, x, train=False)
        return jax.nn.sigmoid(logits) if task == "multilabel" else jax.nn.softmax(logits)

    order_rng = np.random.default_rng(seed)
    losses = []
    with sharding.axis_rules_context(mesh):
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = order_rng.permutation(len(train_images))
            idx = order[(step % steps_per_epoch) * batch:(step % steps_per_epoch + 1) * batch]
            params, opt_state, loss = train_step(
                params, opt_state, jax.device_put(train_images[idx], data), jax.device_put(train_labels[idx], data),
                jax.random.fold_in(step_rng, step), np.float32(lr[step]))
            losses.append(loss)
        scores = []
        for start in range(0, len(test_images), batch):
            chunk = test_images[start:start + batch]
            padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            scores.append(np.asarray(predict(params, jax.device_put(padded, data)))[:len(chunk)])
    return FineTuneResult(np.concatenate(scores), np.asarray(jax.device_get(losses), np.float32))


def resize_size(image_size: int, crop_fraction: float) -> int:
    """The short side images are resized to before the crop (256 for 224 at 0.875)."""
    return int(math.floor(image_size / crop_fraction + 0.5))


def image_splits(config: ml_collections.ConfigDict, dataset: Dataset, encoder: Encoder, eval_dir: str,
                 mesh: jax.sharding.Mesh) -> dict[str, FeatureSet]:
    """Fine-tuning images (the same for every encoder): train at the resize resolution (random crops
    come later), val and test resized and centre-cropped to the fine-tuning resolution."""
    ft = config.finetune
    resize = resize_size(ft.image_size, ft.crop_fraction)

    def load(split: str) -> FeatureSet:
        if split == "train" or not dataset.native_splits:  # a made split mixes records: load all alike
            return load_images(pipeline_config(config, dataset.directory, split, resize, 1.0))
        return load_images(pipeline_config(config, dataset.directory, split, ft.image_size, ft.crop_fraction))

    found = three_splits(config, dataset, load)
    if not dataset.native_splits:  # centre-crop val/test from the resize-resolution images
        for name in ("val", "test"):
            images = found[name].features["image"]
            crops = np.stack([center_crop(im, ft.image_size, ft.crop_fraction) for im in images]) \
                if len(images) else images
            found[name] = dataclasses.replace(found[name], features={"image": crops})
    return found


def _features(config: ml_collections.ConfigDict, encoder: Encoder) -> tuple[str, ...]:
    """The pooled tokens the new head reads; raw pixels have no network to fine-tune."""
    return () if encoder.kind == PIXELS else ("patch_mean_prenorm",)


@protocols.register("finetune", inputs=image_splits, features=_features)
def _scores(config: ml_collections.ConfigDict, row: protocols.Row) -> protocols.Scores:
    result = finetune(config.finetune, row.encoder, row.dataset.task, len(row.dataset.label_names),
                      modality_id(row.dataset.modality), row.train.features["image"], row.train.labels,
                      row.test.features["image"], row.mesh, row.key["seed"])
    return protocols.Scores(result.test_scores)
