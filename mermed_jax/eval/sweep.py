"""A sweep: encoders x datasets x protocols x features x label fractions x seeds, one row each in
EVAL_DIR/results.csv, resumable.

Each finished row is written to results.csv at once, with the test labels and scores beside it
(EVAL_DIR/scores/...npz, for ROC curves), so a sweep that dies loses at most the row it was on; a
rerun skips every row whose key is already in the file. Every host runs every row (its protocol's
collectives need them all); process 0 alone writes both files, and alone reads the scores back
(the report). EVAL_DIR may be a bucket, which has no append: results.csv is rewritten whole with
each new row (it holds a few hundred rows at most). Protocols come from the registry
(mermed_jax/eval/protocols) by the names in config.protocols; each says which rows it plans, what
inputs they run on and how a row is scored, so this module names none of them. Rows of a
deterministic protocol on all labels run once, under the first seed, instead of repeating identical
numbers that would fake a confidence interval.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Iterator

import jax
import ml_collections

from data_pipelines import storage
from data_pipelines.modalities import MODALITIES
from mermed_jax.eval import npz, protocols, subsets
from mermed_jax.eval.encoders import Encoder
from mermed_jax.eval.features import FeatureSet
from mermed_jax.eval.inputs import Dataset, SplitLoader, describe
from mermed_jax.eval.metrics import bootstrap_auroc_ci, compute_metrics

RESULTS_FILE = "results.csv"
KEY_COLUMNS = ("encoder", "dataset", "protocol", "feature", "label_fraction", "seed")
METRIC_COLUMNS = ("auroc", "auroc_lo", "auroc_hi", "auprc", "accuracy", "balanced_accuracy", "f1_macro",
                  "sensitivity", "specificity", "ece")
COLUMNS = KEY_COLUMNS + ("modality", "task", "num_classes", "n_train", "n_val", "n_test", "chosen_c") + \
    METRIC_COLUMNS + ("per_class_auroc", "notes", "seconds")


def row_key(row: dict) -> tuple[str, ...]:
    return tuple(str(row[k]) for k in KEY_COLUMNS)


def read_results(path: str | os.PathLike) -> list[dict]:
    if not storage.exists(path):
        return []
    return list(csv.DictReader(io.StringIO(storage.read_text(path), newline="")))


def write_csv(path: str | os.PathLike, columns: tuple[str, ...] | list[str], rows: list[dict]) -> None:
    """A whole CSV file or object (any location): header, then the rows."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(path, text.getvalue())


def label_fractions(config: ml_collections.ConfigDict, protocol: str) -> tuple[float, ...]:
    """A protocol's own `label_fractions` (config.<protocol>.label_fractions, e.g. fine-tuning at 1%
    and 10% beside probes at 100%), else the sweep's."""
    section = config.get(protocol)
    own = section.get("label_fractions") if isinstance(section, ml_collections.ConfigDict) else None
    return tuple(own) if own else tuple(config.label_fractions)


def planned_rows(config: ml_collections.ConfigDict, encoder: Encoder, dataset: Dataset) -> Iterator[dict]:
    """The keys of every row the config asks of one encoder on one dataset."""
    for name in config.protocols:
        protocol = protocols.get(name)
        for feature in protocol.features(config, encoder):
            for fraction in label_fractions(config, name):
                once = protocol.deterministic and fraction >= 1
                for seed in (config.seeds[:1] if once else config.seeds):
                    yield dict(encoder=encoder.tag, dataset=dataset.name, protocol=name, feature=feature,
                               label_fraction=float(fraction), seed=int(seed))


def scores_path(eval_dir: str | os.PathLike, key: dict) -> str:
    """Where a row's test labels and scores are kept (for the ROC plots)."""
    name = f"{key['protocol']}_{key['feature']}_f{float(key['label_fraction']):g}_s{key['seed']}.npz"
    return storage.join(eval_dir, "scores", key["encoder"], key["dataset"], name)


def run_row(config: ml_collections.ConfigDict, key: dict, dataset: Dataset, splits: dict[str, FeatureSet],
            encoder: Encoder, eval_dir: str, mesh: jax.sharding.Mesh) -> dict:
    """Trains and scores one row on `splits` (its protocol's inputs); returns it."""
    start = time.perf_counter()
    train_idx = subsets.stratified_subset(splits["train"].labels, key["label_fraction"], key["seed"])
    row = protocols.Row(key, dataset, splits["train"].take(train_idx), splits["val"], splits["test"], encoder, mesh)
    scores = protocols.get(key["protocol"]).scores(config, row)
    test_labels = splits["test"].labels
    result = compute_metrics(test_labels, scores.test, dataset.task, dataset.label_names)
    low, high = bootstrap_auroc_ci(test_labels, scores.test, dataset.task, resamples=config.bootstrap.resamples,
                                   seed=config.bootstrap.seed)
    for note in result.notes:
        logging.warning("%s / %s: %s", encoder.tag, dataset.name, note)
    if jax.process_index() == 0:  # every host scores the row; one writes (N writers of one object: 429s on GCS)
        npz.save(scores_path(eval_dir, key), labels=test_labels, scores=scores.test, modality=splits["test"].modality)
    return dict(
        key, modality=dataset.modality, task=dataset.task, num_classes=len(dataset.label_names),
        n_train=len(train_idx), n_val=len(splits["val"].labels), n_test=len(test_labels), chosen_c=scores.chosen_c,
        **result.scalars, auroc_lo=low, auroc_hi=high,
        per_class_auroc=json.dumps(result.per_class_auroc), notes=" | ".join(result.notes),
        seconds=round(time.perf_counter() - start, 2),
    )


def run_sweep(config: ml_collections.ConfigDict, encoders: list[Encoder], eval_dir: str | os.PathLike,
              mesh: jax.sharding.Mesh) -> list[dict]:
    """Runs every row not yet in eval_dir/results.csv (any location); returns all rows (old and new)."""
    eval_dir = os.fspath(eval_dir)
    storage.makedirs(eval_dir)
    results_path = storage.join(eval_dir, RESULTS_FILE)
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
            loaded: dict[SplitLoader, dict[str, FeatureSet]] = {}  # each input loaded once, when first needed
            for key in todo:
                load = protocols.get(key["protocol"]).inputs
                if load not in loaded:
                    loaded[load] = load(config, dataset, encoder, eval_dir, mesh)
                row = run_row(config, key, dataset, loaded[load], encoder, eval_dir, mesh)
                logging.info("%s %s %s %s f=%g seed=%d: AUROC %.4f", *(row[k] for k in KEY_COLUMNS), row["auroc"])
                rows.append({k: "" if v is None else str(v) for k, v in row.items()})
                if jax.process_index() == 0:
                    write_csv(results_path, COLUMNS, rows)
                done.add(row_key(row))
    return rows
