"""Reading back what a pretraining job wrote to its workdir, for the tests that run the job."""

import os

from mermed_jax.training import metric_writers


def losses_by_step(workdir: str | os.PathLike) -> dict[int, float]:
    """The logged loss of each step, as the run stands (read_metrics drops what a resumed run redid)."""
    return {record["step"]: record["loss"] for record in metric_writers.read_metrics(workdir) if "loss" in record}
