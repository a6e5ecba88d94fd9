r"""Evaluation of a demo pretraining run (configs/demo_cpu.py): a linear probe on every demo modality.

Train split -> fit, val -> C, test -> macro AUROC, beside a randomly initialised network of the
same architecture and a raw-pixel probe. Takes well under a minute on 2 CPU cores.

Command:
  python -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=workdirs/demo
  (demo data elsewhere: --config=configs/eval_demo.py:root=/tmp/demo_data)
Expected: the pretrained teacher's AUROC above the random network's on most modalities.
"""

from data_pipelines.modalities import MODALITIES
from mermed_jax.eval.eval_config import eval_recipe
from mermed_jax.recipe import arguments


def get_config(arg: str | None = None):
    options = arguments.parse_arguments(arg)
    root = options.pop("root", "demo_data")
    config = eval_recipe()
    config.name = "demo"
    config.datasets.update({f"demo_{m}": f"{root}/demo_{m}" for m in MODALITIES})
    config.protocols = ("linear",)
    config.seeds = (0,)
    config.data.update(dict(image_size=32, crop_fraction=1.0, batch_size=64))
    config.linear.update(dict(cs=(1e-2, 1e-1, 1.0), max_iter=300))
    config.bootstrap.resamples = 200
    return arguments.apply_arguments(config, options)
