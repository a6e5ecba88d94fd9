r"""Signals that tell a healthy pretraining run from a collapsing one, read from its workdir.

  python -m mermed_jax.health --workdir=WORKDIR [--eval_name=realdata_curve] [--out=PNG]

Prints the signals at five points of the run and draws them (default WORKDIR/health.png): the
memory loss overall and per modality; the teacher's and student's entropy over a memory block,
beside the entropy of a uniform distribution over the block and, once modality gating masks other
modalities' entries, over one modality's share of it; the across-batch spread of the unit
embeddings, beside 1/sqrt(d), the spread of embeddings uniform on the sphere; and, when the run has
an evaluation of several checkpoints (configs/eval_realdata.py `part=curve`, or any `evaluate --watch`
sweep, named by --eval_name), the probe's mean AUROC against the step. docs/health.md says how to
read them.
"""

from __future__ import annotations

import argparse
import collections
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines import storage  # noqa: E402
from mermed_jax.eval import sweep  # noqa: E402
from mermed_jax.eval.encoders import tag_step  # noqa: E402
from mermed_jax.eval.report import save_figure  # noqa: E402
from mermed_jax.training.metric_writers import read_metrics  # noqa: E402

SIGNALS = ("loss", "teacher_entropy", "student_entropy", "teacher_embedding_std", "student_embedding_std")
MODALITY_LOSS = "memory_loss/"
MEMORY_FILL = "memory_fill/"


def series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (steps, values) for every scalar logged, NaN values (absent modalities) left out."""
    found: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for record in records:
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                found[name].append((int(record["step"]), float(value)))
    return {name: (np.array([s for s, _ in pairs]), np.array([v for _, v in pairs])) for name, pairs in found.items()}


def probe_curve(workdir: str, eval_name: str) -> dict[int, float]:
    """step -> mean AUROC over datasets of the checkpoints a sweep evaluated (all labels, first
    protocol and feature in the file); empty when the run has no such evaluation."""
    path = storage.join(workdir, "eval", eval_name, sweep.RESULTS_FILE)
    rows = [r for r in sweep.read_results(path) if tag_step(r["encoder"]) is not None
            and float(r["label_fraction"]) == 1.0]
    if not rows:
        return {}
    first = (rows[0]["protocol"], rows[0]["feature"])
    by_step: dict[int, list[float]] = collections.defaultdict(list)
    for r in rows:
        if (r["protocol"], r["feature"]) == first:
            by_step[tag_step(r["encoder"])].append(float(r["auroc"]))
    return {step: float(np.mean(v)) for step, v in sorted(by_step.items())}


def references(workdir: str, signals: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Entropies of uniform distributions over a memory block and over one modality's share of it
    (the modalities whose memory fill is positive), and the spread of embeddings uniform on the
    sphere, from the run's config and its logged memory fill."""
    config = json.loads(storage.read_text(storage.join(workdir, "config.json")))
    block = config["memory"]["partition_size"]
    present = sum(1 for name, (_, ys) in signals.items()
                  if name.startswith(MEMORY_FILL) and name != MEMORY_FILL + "empty" and ys[-1] > 0)
    return {"entropy": math.log(block), "entropy_gated": math.log(block / max(present, 1)),
            "spread": 1.0 / math.sqrt(config["head"]["bottleneck_dim"])}


def table(signals: dict[str, tuple[np.ndarray, np.ndarray]], curve: dict[int, float], points: int = 5) -> str:
    """The signals at `points` logged steps spread over the run, as a markdown table."""
    steps = signals["loss"][0]
    chosen = sorted({int(steps[round(i * (len(steps) - 1) / (points - 1))]) for i in range(points)})
    modalities = sorted(n for n in signals if n.startswith(MODALITY_LOSS))
    names = list(SIGNALS) + modalities
    lines = ["| step | " + " | ".join(names) + (" | probe AUROC |" if curve else " |"),
             "|---" * (len(names) + 1 + bool(curve)) + "|"]
    for step in chosen:
        cells = []
        for name in names:
            xs, ys = signals.get(name, (np.array([]), np.array([])))
            cells.append(f"{ys[xs == step][0]:.3f}" if (xs == step).any() else "")
        if curve:
            near = min(curve, key=lambda s: abs(s - step))
            cells.append(f"{curve[near]:.3f} (step {near})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(signals: dict[str, tuple[np.ndarray, np.ndarray]], curve: dict[int, float], refs: dict[str, float],
         path: str) -> None:
    panels = 4 if curve else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.4))
    for name in ["loss"] + sorted(n for n in signals if n.startswith(MODALITY_LOSS)):
        xs, ys = signals[name]
        axes[0].plot(xs, ys, lw=2 if name == "loss" else 0.8, label=name.removeprefix(MODALITY_LOSS))
    axes[0].set_title("memory loss (overall and per modality)", fontsize=9)
    for name in ("teacher_entropy", "student_entropy"):
        axes[1].plot(*signals[name], label=name.removesuffix("_entropy"))
    axes[1].axhline(refs["entropy"], color="grey", ls=":", label="uniform over a block")
    axes[1].axhline(refs["entropy_gated"], color="grey", ls="--", label="uniform over one modality's share")
    axes[1].set_title("entropy over a memory block (nats)", fontsize=9)
    for name in ("teacher_embedding_std", "student_embedding_std"):
        axes[2].plot(*signals[name], label=name.removesuffix("_embedding_std"))
    axes[2].axhline(refs["spread"], color="grey", ls=":", label="uniform on the sphere")
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("embedding spread (across-batch std)", fontsize=9)
    if curve:
        axes[3].plot(list(curve), list(curve.values()), marker="o", color="black")
        axes[3].set_title("probe AUROC of checkpoints (mean over sets)", fontsize=9)
    for ax in axes[:3]:
        ax.legend(fontsize=6)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a pretraining workdir (local or a bucket URL)")
    parser.add_argument("--eval_name", default="realdata_curve",
                        help="the evaluation of several checkpoints to draw (WORKDIR/eval/<name>), if present")
    parser.add_argument("--out", default=None, help="the plot (default WORKDIR/health.png)")
    args = parser.parse_args(argv)
    records = read_metrics(args.workdir)
    signals = series(records)
    missing = [name for name in SIGNALS if name not in signals]
    if missing:
        raise SystemExit(f"{args.workdir}: no logged {', '.join(missing)} (has the run logged a step yet?)")
    curve = probe_curve(args.workdir, args.eval_name)
    out = args.out or storage.join(args.workdir, "health.png")
    plot(signals, curve, references(args.workdir, signals), out)
    print(table(signals, curve))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
