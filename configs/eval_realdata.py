r"""Linear probe and kNN on the real sets of ../shared/realdata (converted by bench/eval_realdata.sh):
the four MedMNIST sets, NIH CXR (binary normal/abnormal and the 14-finding multi-label task) and ISIC
(benign/malignant), for a pretraining checkpoint beside a random-init network and raw pixels.

Command (ROOT holds the converted datasets; the real images never enter the repository):
  python -m mermed_jax.evaluate --config=configs/eval_realdata.py:root=ROOT --workdir=PRETRAIN_WORKDIR
Resolution 32 px (the MedMNIST images are 28 px; the CPU pretraining runs at 32 px). OCT has no real
set; CT's only real data is one volume, too little to probe.
"""

from mermed_jax.eval.eval_config import eval_recipe
from mermed_jax.recipe import arguments

DATASETS = ("breastmnist", "pneumoniamnist", "retinamnist", "pathmnist_train1000", "nih_binary", "nih14", "isic")


def get_config(arg: str | None = None):
    options = dict(item.split("=", 1) for item in arg.split(",")) if arg else {}
    root = options.pop("root", "realdata_converted")
    config = eval_recipe()
    config.name = "realdata"
    config.datasets.update({name: f"{root}/{name}" for name in DATASETS})
    config.protocols = ("linear", "knn")
    config.features = ("cls", "patch_mean")
    config.seeds = (0,)
    config.data.update(dict(image_size=32, crop_fraction=1.0, batch_size=256))
    config.linear.update(dict(cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0), max_iter=500))
    return arguments.apply_arguments(config, ",".join(f"{k}={v}" for k, v in options.items()))
