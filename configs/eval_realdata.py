r"""The evaluation sweep on the seven labelled real sets of ../shared/realdata, for a pretraining run
(configs/cpu_realdata.py) beside the random-init network and raw pixels, at 64 px.

Sets: BreastMNIST (US), PneumoniaMNIST (CXR), RetinaMNIST (colour fundus, 5 ordinal grades),
PathMNIST-1000 (pathology, a made 70/15/15 split), NIH CXR-1000 (normal/abnormal, and the 14 findings
as a multi-label task), ISIC (dermoscopy, benign/malignant; a made split). OCT has no real set; CT's
only real data is one unlabelled volume, used in pretraining only.

Commands (ROOT: the output of bench/realdata_convert.sh; the real images never enter the repository):
  python -m mermed_jax.evaluate --config=configs/eval_realdata.py:root=ROOT/data --workdir=PRETRAIN_WORKDIR
  python -m mermed_jax.evaluate --config=configs/eval_realdata.py:root=ROOT/data,part=finetune_full \
      --workdir=PRETRAIN_WORKDIR
The first is the main sweep (`part=main`): linear probe and kNN on all training labels for three
feature choices, and full fine-tuning (protocols/finetune.py: the RETFound recipe at 64 px) at 1% and
10% of the training labels with 3 seeds, where the random-init network is the supervised-from-scratch
baseline. The second fine-tunes on all labels of the six small sets (all but PneumoniaMNIST's 4,707
images, which would take longer than every other cell together). `part=probes` runs the probes alone
(minutes: what the pretraining ablations are compared with); `part=finetune` runs the fine-tuning at
1% and 10% alone, to add seeds without rerunning the probes (a sweep runs its probe rows on all labels
under its first seed). `part=curve` is the kNN AUROC of every checkpoint against its step
(auroc_vs_step.png; with --watch, while pretraining runs).
`features=multiblock+cls`, `baselines=none` (or `random`, `pixels`) and `seeds=0` narrow a sweep, e.g.
for the ablation runs, whose random and raw-pixel floors are the recipe's, or to finish every cell's
first seed before the others (rows already in results.csv are never rerun). AUROC carries a 1,000-resample bootstrap
95% interval of the test set. Expected figures: BENCHMARKS.md, "Real images (issue 16)".
"""

from mermed_jax.eval.eval_config import eval_recipe
from mermed_jax.recipe import arguments

DATASETS = ("breastmnist", "pneumoniamnist", "retinamnist", "pathmnist_train1000", "nih_binary", "nih14", "isic")
# Sets small enough to fine-tune on all of their labels, 3 seeds x 2 networks, in minutes each.
SMALL_DATASETS = tuple(name for name in DATASETS if name != "pneumoniamnist")
IMAGE_SIZE = 64
PARTS = ("main", "probes", "finetune", "finetune_full", "curve")


def get_config(arg: str | None = None):
    options = arguments.parse_arguments(arg)
    root = options.pop("root", "/tmp/mermed_realdata/data")
    part = options.pop("part", "main")
    features = options.pop("features", None)
    baselines = options.pop("baselines", None)
    seeds = options.pop("seeds", None)
    if part not in PARTS:
        raise ValueError(f"part={part!r}: expected one of {PARTS}")
    config = eval_recipe()
    config.name = {"main": "realdata", "probes": "realdata", "finetune": "realdata",
                   "finetune_full": "realdata_finetune_full", "curve": "realdata_curve"}[part]
    names = SMALL_DATASETS if part == "finetune_full" else DATASETS
    config.datasets.update({name: f"{root}/{name}" for name in names})
    config.protocols = {"main": ("linear", "knn", "finetune"), "probes": ("linear", "knn"),
                        "finetune": ("finetune",), "finetune_full": ("finetune",), "curve": ("knn",)}[part]
    config.features = ("multiblock",) if part == "curve" else ("cls", "patch_mean", "multiblock")
    if part == "curve":
        config.checkpoints = "all"
    if features:
        config.features = tuple(features.split("+"))
    if baselines:
        config.baselines = () if baselines == "none" else tuple(baselines.split("+"))
    config.seeds = tuple(int(seed) for seed in seeds.split("+")) if seeds else (0, 1, 2)
    config.pixel_size = 32
    config.data.update(dict(image_size=IMAGE_SIZE, crop_fraction=1.0, batch_size=256))
    config.linear.update(dict(cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), max_iter=1000))
    config.finetune.update(dict(image_size=IMAGE_SIZE, batch_size=64,
                                label_fractions=(1.0,) if part == "finetune_full" else (0.01, 0.1)))
    return arguments.apply_arguments(config, options)
