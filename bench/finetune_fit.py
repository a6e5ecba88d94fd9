"""Does a fine-tuning cell fit its training images at all? One cell of an evaluation sweep (a set, a
label fraction, a seed, the pretrained or random network), trained by the sweep's own protocol
(mermed_jax/eval/protocols/finetune.py), reported with what the sweep does not keep: the training
loss at the start and the end, the AUROC on the training images (centre crops, as the test images),
and the spread of the test scores. A test AUROC far from 0.5 with a flat loss and scores that barely
spread is a head that never moved, not a learned signal.

  python bench/finetune_fit.py --config=configs/eval_realdata.py:root=ROOT/data --workdir=RUN \
      --dataset=nih_binary --fraction=0.1 --seed=0 [finetune.epochs=200 finetune.randaug_ops=0 ...]

Trailing key=value arguments override the eval config (as its own arguments do), e.g. to try the
recipe without its augmentation.
"""

from __future__ import annotations

import argparse

import numpy as np

from data_pipelines.modalities import modality_id
from data_pipelines.multicrop import center_crop
from mermed_jax import sharding
from mermed_jax.eval import encoders, subsets
from mermed_jax.eval.inputs import describe
from mermed_jax.eval.metrics import compute_metrics
from mermed_jax.eval.protocols import finetune
from mermed_jax.recipe import arguments

WINDOW = 5  # steps averaged for the start and end loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an eval config file, optionally with :arguments")
    parser.add_argument("--workdir", required=True, help="the pretraining run (its latest checkpoint)")
    parser.add_argument("--dataset", required=True, help="a name in the config's datasets")
    parser.add_argument("--fraction", type=float, default=0.1, help="label fraction of the training split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=("pretrained", "random"), default="pretrained")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. finetune.epochs=200)")
    args = parser.parse_args()

    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r}: expected key=value")
    path, _, config_arg = args.config.partition(":")
    config = arguments.load_config_file(path, config_arg or None)
    arguments.apply_arguments(config, dict(item.split("=", 1) for item in args.overrides))
    if args.dataset not in config.datasets:
        raise KeyError(f"--dataset={args.dataset!r}: not in the config's datasets {sorted(config.datasets)}")
    dataset = describe(args.dataset, config.datasets[args.dataset])
    mesh = sharding.make_mesh((-1, 1, 1))
    encoder = encoders.with_precision(encoders.from_checkpoint(args.workdir, None, config.normalization),
                                      config.precision)
    if args.encoder == "random":
        encoder = encoders.random_init(encoder)

    splits = finetune.image_splits(config, dataset, encoder, "", mesh)
    chosen = subsets.stratified_subset(splits["train"].labels, args.fraction, args.seed)
    train = splits["train"].take(chosen)
    train_images, test_images = train.features["image"], splits["test"].features["image"]
    ft = config.finetune
    train_views = np.stack([center_crop(im, ft.image_size, ft.crop_fraction) for im in train_images])
    # One run scores the test images and the training images' centre crops together.
    result = finetune.finetune(ft, encoder, dataset.task, len(dataset.label_names), modality_id(dataset.modality),
                               train_images, train.labels, np.concatenate([test_images, train_views]), mesh,
                               args.seed)
    test_scores, train_scores = result.test_scores[:len(test_images)], result.test_scores[len(test_images):]

    def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
        return compute_metrics(labels, scores, dataset.task, dataset.label_names).scalars["auroc"]

    losses = result.losses
    print(f"{dataset.name} {args.encoder} fraction={args.fraction:g} seed={args.seed}: {len(chosen)} training images, "
          f"{len(losses)} steps; loss {losses[:WINDOW].mean():.3f} -> {losses[-WINDOW:].mean():.3f}; "
          f"AUROC train {auroc(train.labels, train_scores):.3f}, test {auroc(splits['test'].labels, test_scores):.3f}; "
          f"test score std {test_scores.std():.4f}")


if __name__ == "__main__":
    main()
