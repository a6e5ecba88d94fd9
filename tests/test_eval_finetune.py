"""Full fine-tuning: a few steps on tiny data (with the whole augmentation) lower the loss; multi-label
sets train with per-label BCE; the layer-decay scales follow MAE's convention."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from repo import pixel_stats

from mermed_jax import sharding
from mermed_jax.eval import finetune_augment
from mermed_jax.eval.encoders import Encoder
from mermed_jax.eval.eval_config import eval_recipe
from mermed_jax.eval.protocols import finetune
from mermed_jax.models.vit import ViT, ViTConfig

CONFIG = ViTConfig(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4, img_size=16, precision="float32")


def _encoder() -> Encoder:
    params = ViT(CONFIG).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
    return Encoder("step_000001", "checkpoint", CONFIG, jax.device_get(params), *pixel_stats())


def _images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 reddish, class 1 bluish, with pixel noise: separable after any crop, flip or erase."""
    rng = np.random.default_rng(n)
    labels = np.arange(n) % 2
    colours = np.array([[200, 40, 40], [40, 40, 200]])[labels]
    images = colours[:, None, None, :] + rng.integers(-30, 30, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def _cfg(**overrides):
    cfg = eval_recipe().finetune
    # Colour is this toy task's signal, and RandAugment's Color/Invert/AutoContrast would destroy it.
    cfg.update(dict(image_size=16, batch_size=16, epochs=10, warmup_epochs=0, base_lr=0.5, drop_path=0.1,
                    erase_prob=0.25, label_smoothing=0.1, randaug_ops=0))
    cfg.update(overrides)
    return cfg


def test_finetune_lowers_the_loss_and_scores_the_test_set():
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:2])
    train_x, train_y = _images(32, 18)
    test_x, test_y = _images(6, 16)
    result = finetune.finetune(_cfg(), _encoder(), "multiclass", 2, 0, train_x, train_y, test_x, mesh, seed=0)
    assert result.losses.shape == (20,) and np.isfinite(result.losses).all()
    assert result.losses[-5:].mean() < result.losses[:5].mean() - 0.05
    assert result.test_scores.shape == (6, 2)
    np.testing.assert_allclose(result.test_scores.sum(1), 1.0, rtol=1e-5)


def test_multilabel_loss_is_per_label_bce():
    logits, labels = jnp.array([[0.0, 2.0]]), jnp.array([[1, 0]])
    expected = (np.log(2) + np.log1p(np.exp(2.0))) / 2
    assert float(finetune._loss(logits, labels, "multilabel", 0.1)) == pytest.approx(expected, rel=1e-5)


def test_layer_decay_scales_follow_mae():
    params = {"backbone": {"patch_embed": {"kernel": np.zeros(2)}, "blocks_0": {"w": np.zeros(2)},
                           "blocks_1": {"w": np.zeros(2)}, "norm": {"scale": np.zeros(2)}},
              "fc_norm": {"scale": np.zeros(2)}, "head": {"kernel": np.zeros(2)}}
    scales = finetune.layer_decay_scales(params, depth=2, decay=0.5)
    assert scales["head"]["kernel"] == pytest.approx(1.0) and scales["fc_norm"]["scale"] == pytest.approx(1.0)
    assert scales["backbone"]["blocks_1"]["w"] == pytest.approx(0.5)
    assert scales["backbone"]["blocks_0"]["w"] == pytest.approx(0.25)
    assert scales["backbone"]["patch_embed"]["kernel"] == pytest.approx(0.125)


def test_train_view_with_rand_augment_and_erasing():
    image = jnp.asarray(_images(1, 20)[0][0])
    views = jax.vmap(lambda k: finetune_augment.train_view(k, image, 16, jnp.full(3, 0.5), jnp.full(3, 0.25), 1.0))(
        jax.random.split(jax.random.key(0), 4))
    assert views.shape == (4, 16, 16, 3) and bool(jnp.isfinite(views).all())
    assert not np.allclose(views[0], views[1])


@pytest.mark.realdata
def test_finetune_on_real_breastmnist_through_the_sweep(realdata, tmp_path):
    """The evaluation sweep's fine-tuning protocol on a real set (BreastMNIST, 546 train / 156 test
    ultrasound images at 28 px): a few steps from a random ViT, test scores for every test image,
    and an AUROC in the results."""
    from data_pipelines.shard_writer import ConvertOptions, convert
    from data_pipelines.sources.medmnist import MedMnistSource
    from mermed_jax import evaluate

    convert(MedMnistSource(realdata / "medmnist" / "breastmnist.npz"), bytes(range(32)),
            ConvertOptions(dataset="breastmnist", out_dir=tmp_path / "data", progress=False, shard_size=512))
    config = eval_recipe()
    config.datasets = {"breastmnist": str(tmp_path / "data" / "breastmnist")}
    config.protocols, config.baselines, config.seeds, config.plots = ("finetune",), (), (0,), False
    config.data.update(dict(image_size=16, crop_fraction=1.0, batch_size=64))
    config.finetune.update(dict(image_size=16, batch_size=32, max_steps=6, warmup_epochs=0))
    rows = evaluate.evaluate(config, [_encoder()], tmp_path / "eval")
    assert "| breastmnist | us |" in rows
    with open(tmp_path / "eval" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["protocol"] == "finetune" and row["n_test"] == "156" and 0.0 <= float(row["auroc"]) <= 1.0
