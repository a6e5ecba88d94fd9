"""One table of what each part of the recipe is worth on the real sets: the linear-probe AUROC of the
last checkpoint of several pretraining runs (configs/cpu_realdata.py and its ablation arguments),
each evaluated by configs/eval_realdata.py, beside the random-init network and raw pixels.

  python bench/realdata_ablations.py recipe=RUN_A,RUN_B no_gating=RUN_C,RUN_D natural=RUN_E ...

Each argument is NAME=WORKDIR[,WORKDIR...]: the runs of one setting (pretraining seeds). A setting
with several runs shows the mean over seeds and, under it, the seeds' spread (max - min) per set:
a difference between settings smaller than that spread is not told from noise.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from mermed_jax.eval import sweep
from mermed_jax.eval.encoders import PIXELS, RANDOM, tag_step


def last_checkpoint_scores(results: list[dict], protocol: str, feature: str) -> dict[str, dict[str, float]]:
    """{encoder: {dataset: AUROC}} for the run's last checkpoint and the baselines, all labels, seed 0."""
    rows = [r for r in results if r["protocol"] == protocol and r["feature"] in (feature, PIXELS)
            and float(r["label_fraction"]) == 1.0]
    steps = [s for s in (tag_step(r["encoder"]) for r in rows) if s is not None]
    if not steps:
        raise ValueError(f"no {protocol} rows of a checkpoint on {feature!r} features")
    last = max(steps)
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        step = tag_step(r["encoder"])
        name = "pretrained" if step == last else r["encoder"] if r["encoder"] in (RANDOM, PIXELS) else None
        if name is not None:
            table.setdefault(name, {})[r["dataset"]] = float(r["auroc"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="NAME=WORKDIR[,WORKDIR...]")
    parser.add_argument("--eval-name", default="realdata", help="the eval config's name (WORKDIR/eval/<name>)")
    parser.add_argument("--protocol", default="linear")
    parser.add_argument("--feature", default="multiblock")
    args = parser.parse_args()
    per_setting: dict[str, list[dict[str, float]]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for item in args.settings:
        name, _, dirs = item.partition("=")
        for workdir in dirs.split(","):
            path = pathlib.Path(workdir) / "eval" / args.eval_name / sweep.RESULTS_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not evaluated yet (python -m mermed_jax.evaluate ...)")
            table = last_checkpoint_scores(sweep.read_results(path), args.protocol, args.feature)
            per_setting.setdefault(name, []).append(table["pretrained"])
            for baseline in (RANDOM, PIXELS):
                if baseline in table:
                    baselines.setdefault(baseline, table[baseline])
    datasets = sorted(next(iter(per_setting.values()))[0])
    print(f"{args.protocol} probe AUROC ({args.feature} features; pixels for the raw-pixel row), last checkpoint\n")
    print("| setting | runs | " + " | ".join(datasets) + " | mean |")
    print("|---|---|" + "---|" * (len(datasets) + 1))
    for name, runs in list(per_setting.items()) + [(b, [baselines[b]]) for b in (RANDOM, PIXELS) if b in baselines]:
        scores = np.array([[run.get(d, np.nan) for d in datasets] for run in runs])
        mean = scores.mean(0)
        print(f"| {name} | {len(runs)} | " + " | ".join(f"{v:.3f}" for v in mean) + f" | {np.nanmean(mean):.3f} |")
        if len(runs) > 1:
            spread = scores.max(0) - scores.min(0)
            print(f"| (seed spread) | | " + " | ".join(f"{v:.3f}" for v in spread)
                  + f" | {np.ptp(np.nanmean(scores, 1)):.3f} |")


if __name__ == "__main__":
    main()
