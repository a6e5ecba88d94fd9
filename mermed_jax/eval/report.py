"""Reports of a sweep: summary.csv (mean and 95% CI over seeds), results.md (tables with every
encoder side by side, so a number always has its random-init and raw-pixel floors beside it) and
plots (per-dataset AUROC bars with CIs, ROC curves, AUROC against label fraction, AUROC against the
checkpoint's step when a sweep holds several checkpoints (`evaluate --watch` or checkpoints="all":
how a run learns), a 2-D PCA map of the test embeddings coloured by modality and by label).

CIs: over seeds (Student t) when a row has several seeds; otherwise the bootstrap CI of its test
set, and the table says which.

Everything is written whole through data_pipelines.storage (plots rendered to PNG bytes first), so
the evaluation directory may be local or a bucket.
"""

from __future__ import annotations

import collections
import io
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from data_pipelines import storage  # noqa: E402
from data_pipelines.modalities import MODALITIES  # noqa: E402
from mermed_jax.eval import npz, sweep  # noqa: E402
from mermed_jax.eval.encoders import tag_step  # noqa: E402
from mermed_jax.eval.metrics import mean_ci, one_hot  # noqa: E402

GROUP = ("encoder", "dataset", "protocol", "feature", "label_fraction")


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (encoder, dataset, protocol, feature, fraction): AUROC mean and 95% CI."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in GROUP)].append(row)
    out = []
    for key, members in groups.items():
        aurocs = [float(r["auroc"]) for r in members]
        if len(members) > 1:
            mean, low, high = mean_ci(aurocs)
            kind = f"t over {len(members)} seeds"
        else:
            mean, low, high = aurocs[0], float(members[0]["auroc_lo"]), float(members[0]["auroc_hi"])
            kind = "bootstrap"
        out.append(dict(zip(GROUP, key), modality=members[0]["modality"], n_test=members[0]["n_test"],
                        seeds=len(members), auroc=mean, ci_lo=low, ci_hi=high, ci=kind,
                        accuracy=float(np.mean([float(r["accuracy"]) for r in members])),
                        notes=members[0].get("notes", "")))
    return out


def _cell(line: dict | None) -> str:
    if line is None:
        return "-"
    if math.isnan(line["ci_lo"]):
        return f"{line['auroc']:.3f}"
    return f"{line['auroc']:.3f} [{line['ci_lo']:.3f}, {line['ci_hi']:.3f}]"


def _encoders(summary: list[dict]) -> list[str]:
    """Checkpoints first, then the floors (random init, raw pixels)."""
    names = sorted({s["encoder"] for s in summary})
    return [n for n in names if not n.startswith(("random", "pixels"))] + [n for n in names if n.startswith("random")] + \
        [n for n in names if n.startswith("pixels")]


def markdown(summary: list[dict]) -> str:
    """Per protocol, feature and label fraction: one row per dataset, one column per encoder
    (AUROC [95% CI]); the raw-pixel column is the same pixel probe in every table."""
    encoders = _encoders(summary)
    by_key = {(s["encoder"], s["dataset"], s["protocol"], s["feature"], s["label_fraction"]): s for s in summary}
    lines = []
    settings = sorted({(s["protocol"], s["feature"], s["label_fraction"]) for s in summary if s["feature"] != "pixels"},
                      key=lambda p: (p[0], p[1], float(p[2])))
    datasets = sorted({(MODALITIES.index(s["modality"]), s["dataset"]) for s in summary})
    for protocol, feature, fraction in settings:
        lines.append(f"\n### {protocol} on {feature} features, {float(fraction):.0%} of training labels\n")
        lines.append("| dataset | modality | n test | " + " | ".join(encoders) + " |")
        lines.append("|---|---|---|" + "---|" * len(encoders))
        table = []
        for _, dataset in datasets:
            cells = [by_key.get((e, dataset, protocol, "pixels" if e.startswith("pixels") else feature, fraction))
                     for e in encoders]
            first = next((c for c in cells if c is not None), None)
            if first is None:
                continue
            table.append(cells)
            lines.append(f"| {dataset} | {first['modality']} | {first['n_test']} | " + " | ".join(map(_cell, cells)) + " |")
        if len(table) > 1:  # unweighted mean over datasets, where an encoder has them all
            means = [np.mean([row[i]["auroc"] for row in table]) if all(row[i] for row in table) else None
                     for i in range(len(encoders))]
            lines.append(f"| mean of {len(table)} | | | " + " | ".join("-" if m is None else f"{m:.3f}" for m in means) + " |")
    kinds = sorted({s["ci"] for s in summary})
    notes = sorted({n for s in summary for n in s["notes"].split(" | ") if n})
    lines.append(f"\nMacro one-vs-rest AUROC on the test split; 95% CI: {'; '.join(kinds)}.")
    lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines) + "\n"


def save_figure(fig: plt.Figure, path: str) -> None:
    """The figure as a PNG at `path` (any location); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def _plot_bars(summary: list[dict], path: str) -> list[str]:
    """One panel per protocol and feature of the sweep (all training labels), one bar per encoder
    and dataset; returns the panels' titles."""
    encoders = _encoders(summary)
    full = [s for s in summary if float(s["label_fraction"]) == 1.0]
    settings = sorted({(s["protocol"], s["feature"]) for s in full if s["feature"] != "pixels"})
    if not settings:
        return []
    datasets = sorted({s["dataset"] for s in full})
    fig, axes = plt.subplots(len(settings), 1, squeeze=False,
                             figsize=(max(6, 1.2 * len(datasets) * len(encoders) / 2), 4 * len(settings)))
    width = 0.8 / len(encoders)
    titles = []
    for ax, (protocol, feature) in zip(axes[:, 0], settings):
        for i, enc in enumerate(encoders):
            lines = {s["dataset"]: s for s in full if s["encoder"] == enc and s["protocol"] == protocol
                     and (s["feature"] == feature or enc.startswith("pixels"))}
            values = np.array([lines[d]["auroc"] if d in lines else np.nan for d in datasets])
            low = np.array([lines[d]["ci_lo"] if d in lines else np.nan for d in datasets])
            high = np.array([lines[d]["ci_hi"] if d in lines else np.nan for d in datasets])
            err = np.nan_to_num(np.stack([values - low, high - values]))
            ax.bar(np.arange(len(datasets)) + i * width, values, width, yerr=err, capsize=2, label=enc)
        ax.set_xticks(np.arange(len(datasets)) + width * (len(encoders) - 1) / 2, datasets, rotation=30, ha="right")
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_ylabel("macro AUROC (95% CI)")
        titles.append(f"{protocol} ({feature}), all training labels")
        ax.set_title(titles[-1])
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return titles


def _plot_roc(rows: list[dict], eval_dir: str, path: str) -> None:
    """Micro-averaged one-vs-rest ROC per dataset, one curve per encoder (first seed, all labels)."""
    chosen = {}
    for r in rows:
        if float(r["label_fraction"]) == 1.0 and r["protocol"] != "finetune":
            chosen.setdefault((r["dataset"], r["encoder"]), r)
    datasets = sorted({d for d, _ in chosen})
    if not datasets:
        return
    cols = min(4, len(datasets))
    fig, axes = plt.subplots(math.ceil(len(datasets) / cols), cols, figsize=(3.2 * cols, 3.2 * math.ceil(len(datasets) / cols)),
                             squeeze=False)
    for ax, dataset in zip(axes.ravel(), datasets):
        for (d, enc), r in sorted(chosen.items()):
            if d != dataset:
                continue
            score_path = sweep.scores_path(eval_dir, r)
            if not storage.exists(score_path):
                continue
            saved = npz.load(score_path)
            labels, scores = saved["labels"], saved["scores"]
            targets = one_hot(labels, scores.shape[1]) if labels.ndim == 1 else labels
            fpr, tpr, _ = skm.roc_curve(targets.ravel(), scores.ravel())
            ax.plot(fpr, tpr, label=f"{enc} ({r['protocol']})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(datasets):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def _plot_steps(summary: list[dict], path: str) -> list[str]:
    """Per protocol and feature (all training labels): the mean AUROC over datasets of each
    checkpoint against its step, each dataset's thin line behind it, and the random network and raw
    pixels as flat lines. Drawn when the sweep holds two checkpoints or more; returns the titles."""
    full = [s for s in summary if float(s["label_fraction"]) == 1.0]
    step_of = {s["encoder"]: tag_step(s["encoder"]) for s in full}
    steps = sorted(set(step_of.values()) - {None})
    settings = sorted({(s["protocol"], s["feature"]) for s in full if step_of[s["encoder"]] is not None})
    if len(steps) < 2 or not settings:
        return []
    fig, axes = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 3.4), squeeze=False)
    titles = []
    for ax, (protocol, feature) in zip(axes[0], settings):
        rows = [s for s in full if s["protocol"] == protocol and (s["feature"] == feature or s["feature"] == "pixels")]
        datasets = sorted({s["dataset"] for s in rows})
        by_step = collections.defaultdict(dict)
        for s in rows:
            if step_of[s["encoder"]] is not None:
                by_step[s["dataset"]][step_of[s["encoder"]]] = s["auroc"]
        for dataset in datasets:
            xs = sorted(by_step[dataset])
            ax.plot(xs, [by_step[dataset][x] for x in xs], lw=0.7, alpha=0.5, label=dataset)
        mean = [np.mean([by_step[d][x] for d in datasets if x in by_step[d]]) for x in steps]
        ax.plot(steps, mean, marker="o", color="black", lw=2, label="mean")
        for floor, style in (("random", "--"), ("pixels", ":")):
            values = [s["auroc"] for s in rows if s["encoder"].startswith(floor)]
            if values:
                ax.axhline(np.mean(values), color="grey", ls=style, label=f"{floor} (mean)")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("macro AUROC")
        titles.append(f"{protocol} ({feature}) against the step")
        ax.set_title(titles[-1], fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    return titles


def _plot_fractions(summary: list[dict], path: str) -> None:
    fractions = {float(s["label_fraction"]) for s in summary}
    if len(fractions) < 2:
        return
    datasets = sorted({s["dataset"] for s in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.5 * len(datasets), 3.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        curves = collections.defaultdict(list)
        for s in summary:
            if s["dataset"] == dataset:
                curves[(s["encoder"], s["protocol"], s["feature"])].append(s)
        for (enc, protocol, feature), points in sorted(curves.items()):
            points.sort(key=lambda s: float(s["label_fraction"]))
            x = [100 * float(s["label_fraction"]) for s in points]
            y = np.array([s["auroc"] for s in points])
            ax.plot(x, y, marker="o", label=f"{enc} {protocol}/{feature}")
            low, high = np.array([s["ci_lo"] for s in points]), np.array([s["ci_hi"] for s in points])
            ax.fill_between(x, low, high, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("% of training labels")
        ax.set_ylabel("macro AUROC")
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_embedding(eval_dir: str, encoder: str, path: str, feature: str = "cls") -> None:
    """PCA of the cached test features of `encoder` over all datasets: by modality and by label."""
    folder = storage.join(eval_dir, "features", encoder)
    files = [storage.join(folder, d, "test.npz") for d in storage.listdir(folder)]
    feats, modality, labels = [], [], []
    for f in files:
        if not storage.exists(f):
            continue
        cached = npz.load(f)
        if feature not in cached:
            continue
        feats.append(cached[feature])
        modality.append(cached["modality"])
        lab = cached["labels"]
        labels.append(lab if lab.ndim == 1 else np.where(lab.any(1), lab.argmax(1), -1))
    if not feats or sum(len(f) for f in feats) < 3:
        return
    xy = PCA(2).fit_transform(np.concatenate(feats))
    modality, labels = np.concatenate(modality), np.concatenate(labels)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for m in np.unique(modality):
        axes[0].scatter(*xy[modality == m].T, s=6, label=MODALITIES[m])
    axes[0].legend(fontsize=7, markerscale=2)
    axes[0].set_title(f"{encoder} {feature}: by modality")
    axes[1].scatter(*xy.T, s=6, c=labels, cmap="tab10")
    axes[1].set_title("by label (first label of multi-label rows)")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(eval_dir: str | os.PathLike, rows: list[dict], plots: bool = True) -> str:
    """Writes summary.csv, results.md and the plots into eval_dir (any location); returns the markdown."""
    eval_dir = os.fspath(eval_dir)
    summary = summarize(rows)
    if summary:
        sweep.write_csv(storage.join(eval_dir, "summary.csv"), list(summary[0]), summary)
    text = markdown(summary)
    storage.write_text(storage.join(eval_dir, "results.md"), text)
    if plots and summary:
        _plot_bars(summary, storage.join(eval_dir, "auroc_bars.png"))
        _plot_roc(rows, eval_dir, storage.join(eval_dir, "roc_curves.png"))
        _plot_fractions(summary, storage.join(eval_dir, "auroc_vs_fraction.png"))
        _plot_steps(summary, storage.join(eval_dir, "auroc_vs_step.png"))
        _plot_embedding(eval_dir, _encoders(summary)[0], storage.join(eval_dir, "embedding_map.png"))
    return text
