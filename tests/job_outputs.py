"""Reading back what a pretraining job wrote to its workdir, for the tests that run the job."""

import json
import pathlib


def losses_by_step(workdir: str | pathlib.Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs again from its checkpoint on)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out
