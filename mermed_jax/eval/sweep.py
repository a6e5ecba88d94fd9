"""A sweep: encoders x datasets x protocols x features x label fractions x seeds, one row each in
EVAL_DIR/results.csv, resumable.

Each finished row is appended to results.csv at once, with the test labels and scores beside it
(EVAL_DIR/scores/...npz, for ROC curves), so a sweep that dies loses at most the row it was on; a
rerun skips every row whose key is already in the file. Rows whose outcome cannot depend on the seed
(linear probe and kNN on all labels: lbfgs and kNN are deterministic) run once, under the first seed,
instead of repeating identical numbers that would fake a confidence interval.

Splits: a dataset's own train/val/test when its manifest has them; otherwise every record it has is
split 70/15/15, stratified, with config.splits.seed (42), as the official evaluation does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from data_pipelines import eval_pipeline, records
from data_pipelines.modalities import MODALITIES, modality_id
from data_pipelines.multicrop import center_crop
from mermed_jax.eval import finetune, probes, subsets
from mermed_jax.eval.encoders import PIXELS, Encoder
from mermed_jax.eval.features import FeatureSet, cached_features, load_images
from mermed_jax.eval.metrics import bootstrap_auroc_ci, compute_metrics, one_hot

PROTOCOLS = ("linear", "knn", "finetune")
SPLITS = ("train", "val", "test")
KEY_COLUMNS = ("encoder", "dataset", "protocol", "feature", "label_fraction", "seed")
METRIC_COLUMNS = ("auroc", "auroc_lo", "auroc_hi", "auprc", "accuracy", "balanced_accuracy", "f1_macro",
                  "sensitivity", "specificity", "ece")
COLUMNS = KEY_COLUMNS + ("modality", "task", "num_classes", "n_train", "n_val", "n_test", "chosen_c") + \
    METRIC_COLUMNS + ("per_class_auroc", "notes", "seconds")


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    directory: str
    modality: str
    label_names: tuple[str, ...]
    task: str  # "multiclass" or "multilabel"
    native_splits: bool  # the manifest has train, val and test


def describe(name: str, directory: str) -> Dataset:
    manifest = records.load_manifest(directory)
    return Dataset(name, str(directory), manifest.modality, manifest.label_names,
                   "multilabel" if manifest.multi_label else "multiclass",
                   all(s in manifest.splits for s in SPLITS))


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in KEY_COLUMNS)


def read_results(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append(path: pathlib.Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _eval_config(config: ml_collections.ConfigDict, directory: str, split: str, image_size: int,
                 crop_fraction: float) -> eval_pipeline.EvalConfig:
    devices = jax.device_count()
    batch = -(-config.data.batch_size // devices) * devices  # a whole number of rows per device
    return eval_pipeline.EvalConfig(dirs=(directory,), split=split, batch_size=batch, image_size=image_size,
                                    crop_fraction=crop_fraction, labels="multi_hot",
                                    read_threads=config.data.read_threads)


def _three_splits(config: ml_collections.ConfigDict, dataset: Dataset,
                  load: Callable[[str], FeatureSet]) -> dict[str, FeatureSet]:
    """train/val/test: the native splits, or a stratified split of all records (same order every load)."""
    if dataset.native_splits:
        return {s: load(s) for s in SPLITS}
    parts = [load(s) for s in sorted(records.load_manifest(dataset.directory).splits)]
    merged = FeatureSet({k: np.concatenate([p.features[k] for p in parts]) for k in parts[0].features},
                        np.concatenate([p.labels for p in parts]), np.concatenate([p.modality for p in parts]))
    chosen = subsets.stratified_split(merged.labels, tuple(config.splits.fractions), config.splits.seed)
    return {name: FeatureSet({k: v[idx] for k, v in merged.features.items()}, merged.labels[idx], merged.modality[idx])
            for name, idx in zip(SPLITS, chosen)}


def feature_splits(config: ml_collections.ConfigDict, dataset: Dataset, encoder: Encoder, eval_dir: pathlib.Path,
                   mesh: jax.sharding.Mesh) -> dict[str, FeatureSet]:
    d = config.data
    return _three_splits(config, dataset, lambda split: cached_features(
        eval_dir / "features", encoder, dataset.name,
        _eval_config(config, dataset.directory, split, d.image_size, d.crop_fraction), mesh, config.pixel_size))


def image_splits(config: ml_collections.ConfigDict, dataset: Dataset) -> dict[str, FeatureSet]:
    """Fine-tuning images: train at the resize resolution (random crops come later), val and test
    resized and centre-cropped to the fine-tuning resolution."""
    ft = config.finetune
    resize = finetune.resize_size(ft.image_size, ft.crop_fraction)

    def load(split: str) -> FeatureSet:
        if split == "train" or not dataset.native_splits:  # a made split mixes records: load all alike
            return load_images(_eval_config(config, dataset.directory, split, resize, 1.0))
        return load_images(_eval_config(config, dataset.directory, split, ft.image_size, ft.crop_fraction))

    found = _three_splits(config, dataset, load)
    if not dataset.native_splits:  # centre-crop val/test from the resize-resolution images
        for name in ("val", "test"):
            images = found[name].features["image"]
            crops = np.stack([center_crop(im, ft.image_size, ft.crop_fraction) for im in images]) if len(images) else images
            found[name] = dataclasses.replace(found[name], features={"image": crops})
    return found


def planned_rows(config: ml_collections.ConfigDict, encoder: Encoder, dataset: Dataset) -> Iterator[dict]:
    """The keys of every row the config asks of one encoder on one dataset."""
    for protocol in config.protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocols: {protocol!r} is not one of {PROTOCOLS}")
        if protocol == "finetune" and encoder.kind == PIXELS:
            continue  # raw pixels have no network to fine-tune
        if protocol == "finetune":
            feature_names = ("patch_mean_prenorm",)
        else:
            feature_names = (PIXELS,) if encoder.kind == PIXELS else tuple(config.features)
        for feature in feature_names:
            for fraction in config.label_fractions:
                seeded = protocol == "finetune" or fraction < 1
                for seed in (config.seeds if seeded else config.seeds[:1]):
                    yield dict(encoder=encoder.tag, dataset=dataset.name, protocol=protocol, feature=feature,
                               label_fraction=float(fraction), seed=int(seed))


def _scores(config: ml_collections.ConfigDict, key: dict, dataset: Dataset, splits: dict[str, FeatureSet],
            train_idx: np.ndarray, encoder: Encoder, mesh: jax.sharding.Mesh) -> tuple[np.ndarray, float | None]:
    """Test scores of one row, and the chosen C for the linear probe."""
    num_classes = len(dataset.label_names)
    train, val, test = splits["train"], splits["val"], splits["test"]
    if key["protocol"] == "linear":
        f = key["feature"]
        result = probes.linear_probe((train.features[f][train_idx], train.labels[train_idx]),
                                     (val.features[f], val.labels), test.features[f], dataset.task, num_classes,
                                     tuple(config.linear.cs), config.linear.max_iter)
        return result.test_scores, result.chosen_c
    if key["protocol"] == "knn":
        f = key["feature"]
        labels = train.labels[train_idx]
        targets = one_hot(labels, num_classes) if dataset.task == "multiclass" else labels
        return probes.knn_scores(train.features[f][train_idx], targets, test.features[f],
                                 config.knn.k, config.knn.temperature), None
    result = finetune.finetune(config.finetune, encoder, dataset.task, num_classes, modality_id(dataset.modality),
                               train.features["image"][train_idx], train.labels[train_idx],
                               test.features["image"], mesh, key["seed"])
    return result.test_scores, None


def run_row(config: ml_collections.ConfigDict, key: dict, dataset: Dataset, splits: dict[str, FeatureSet],
            encoder: Encoder, eval_dir: pathlib.Path, mesh: jax.sharding.Mesh) -> dict:
    """Trains and scores one row (features, or images for fine-tuning, in `splits`); returns it."""
    start = time.perf_counter()
    train_idx = subsets.stratified_subset(splits["train"].labels, key["label_fraction"], key["seed"])
    scores, chosen_c = _scores(config, key, dataset, splits, train_idx, encoder, mesh)
    test_labels = splits["test"].labels
    result = compute_metrics(test_labels, scores, dataset.task, dataset.label_names)
    low, high = bootstrap_auroc_ci(test_labels, scores, dataset.task, resamples=config.bootstrap.resamples,
                                   seed=config.bootstrap.seed)
    for note in result.notes:
        logging.warning("%s / %s: %s", encoder.tag, dataset.name, note)
    path = eval_dir / "scores" / key["encoder"] / key["dataset"] / \
        f"{key['protocol']}_{key['feature']}_f{key['label_fraction']:g}_s{key['seed']}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, labels=test_labels, scores=scores, modality=splits["test"].modality)
    return dict(
        key, modality=dataset.modality, task=dataset.task, num_classes=len(dataset.label_names),
        n_train=len(train_idx), n_val=len(splits["val"].labels), n_test=len(test_labels), chosen_c=chosen_c,
        **result.scalars, auroc_lo=low, auroc_hi=high,
        per_class_auroc=json.dumps(result.per_class_auroc), notes=" | ".join(result.notes),
        seconds=round(time.perf_counter() - start, 2),
    )


def run_sweep(config: ml_collections.ConfigDict, encoders: list[Encoder], eval_dir: pathlib.Path,
              mesh: jax.sharding.Mesh) -> list[dict]:
    """Runs every row not yet in eval_dir/results.csv; returns all rows (old and new)."""
    eval_dir = pathlib.Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    results_path = eval_dir / "results.csv"
    rows = read_results(results_path)
    done = {row_key(r) for r in rows}
    datasets = [describe(name, directory) for name, directory in config.datasets.items()]
    for dataset in datasets:
        if dataset.modality not in MODALITIES:
            raise ValueError(f"datasets.{dataset.name}: unknown modality {dataset.modality!r}")
    for encoder in encoders:
        for dataset in datasets:
            todo = [k for k in planned_rows(config, encoder, dataset) if row_key(k) not in done]
            if not todo:
                continue
            features = images = None
            for key in todo:
                if key["protocol"] == "finetune":
                    images = images or image_splits(config, dataset)
                    splits = images
                else:
                    features = features or feature_splits(config, dataset, encoder, eval_dir, mesh)
                    splits = features
                row = run_row(config, key, dataset, splits, encoder, eval_dir, mesh)
                logging.info("%s %s %s %s f=%g seed=%d: AUROC %.4f", *(row[k] for k in KEY_COLUMNS), row["auroc"])
                if jax.process_index() == 0:
                    _append(results_path, row)
                rows.append({k: "" if v is None else str(v) for k, v in row.items()})
                done.add(row_key(row))
    return rows
