r"""Downstream evaluation of a pretraining run: frozen-feature probes, kNN, label fractions and full
fine-tuning, with AUROC reports, from an ml-collections eval config.

  python -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=workdirs/demo
  python -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=workdirs/demo --step=200
  python -m mermed_jax.evaluate --config=configs/eval_demo.py --workdir=workdirs/demo --watch
  python -m mermed_jax.evaluate --config=configs/eval_demo.py --export=mermed_b16.safetensors --eval_dir=/tmp/ev

--workdir is a pretraining workdir: the teacher backbone of its Orbax checkpoints is evaluated (the
config's `checkpoints`, or --step; --watch evaluates each new checkpoint as training writes it and
stops after `watch.idle_timeout_seconds` without one). --export evaluates an exported file instead
(mermed_jax.export; its config JSON gives architecture and pixel statistics). Every sweep also
evaluates the config's baselines (a randomly initialised network of the same architecture and raw
pixels). Results go to --eval_dir (default WORKDIR/eval/<config.name>): results.csv (one row per
encoder x dataset x protocol x feature x label fraction x seed; a rerun skips rows already there),
summary.csv, results.md, plots, and features/ (the cached features). Every location may be local
or a bucket URL: --workdir gs:// (pretraining workdirs cannot be on s3://), --eval_dir and --export
gs:// or s3://.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from data_pipelines import storage
from mermed_jax import distributed, sharding
from mermed_jax.eval import encoders as encoders_lib
from mermed_jax.eval import report, sweep
from mermed_jax.eval.eval_config import validate


def _checkpoint_steps(config: ml_collections.ConfigDict, workdir: str, step: int | None) -> list[int]:
    available = encoders_lib.checkpoint_steps(workdir)
    if not available:
        raise FileNotFoundError(f"{workdir}/checkpoints: no complete checkpoint")
    if step is not None:
        wanted = [step]
    elif config.checkpoints == "latest":
        wanted = available[-1:]
    elif config.checkpoints == "all":
        wanted = available
    else:
        wanted = list(config.checkpoints)
    missing = [s for s in wanted if s not in available]
    if missing:
        raise FileNotFoundError(f"{workdir}/checkpoints: no step {missing} (have {available})")
    return wanted


def with_baselines(config: ml_collections.ConfigDict, encoders: list[encoders_lib.Encoder]) -> list[encoders_lib.Encoder]:
    """The encoders followed by the config's floors, built like the first one."""
    out = list(encoders)
    if "random" in config.baselines:
        out.append(encoders_lib.random_init(encoders[0]))
    if "pixels" in config.baselines:
        out.append(encoders_lib.raw_pixels(encoders[0]))
    return out


def evaluate(config: ml_collections.ConfigDict, encoders: list[encoders_lib.Encoder], eval_dir: str | os.PathLike) -> str:
    """Runs (or resumes) the sweep over `encoders` and the baselines; returns the markdown report."""
    mesh = sharding.make_mesh((-1, 1, 1))
    encoders = [encoders_lib.with_precision(e, config.precision) for e in encoders]
    rows = sweep.run_sweep(config, with_baselines(config, encoders), eval_dir, mesh)
    if jax.process_index() != 0:
        return ""
    return report.write_report(eval_dir, rows, plots=config.plots)


def _from_process_0(values: list[int]) -> list[int]:
    """Process 0's list of ints, on every process (the others' `values` are ignored); one process
    returns its own. A variable length: the count goes first, then the list."""
    if jax.process_count() == 1:
        return list(values)
    count = int(multihost_utils.broadcast_one_to_all(np.asarray(len(values), np.int32)))
    if count == 0:
        return []
    mine = np.asarray(values, np.int32) if jax.process_index() == 0 else np.zeros(count, np.int32)
    return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)]


def watch(config: ml_collections.ConfigDict, workdir: str, eval_dir: str | os.PathLike) -> None:
    """Evaluates each new checkpoint of a running job until none appears for the idle timeout.

    Process 0 alone lists the checkpoints and decides when to stop, and every process takes its
    answer: hosts that listed on their own could see a new step at different polls and enter the
    sweep's collectives out of step."""
    seen: set[int] = set()
    last_new = time.monotonic()
    while True:
        stop = time.monotonic() - last_new >= config.watch.idle_timeout_seconds
        listed = [] if stop or jax.process_index() > 0 else encoders_lib.checkpoint_steps(workdir)
        shared = _from_process_0([int(stop), *listed])
        if shared[0]:
            break
        new = [s for s in shared[1:] if s not in seen]
        for step in new:
            logging.info("watch: evaluating checkpoint %d", step)
            print(evaluate(config, [encoders_lib.from_checkpoint(workdir, step, config.normalization)], eval_dir))
            seen.add(step)
            last_new = time.monotonic()
        if not new:
            time.sleep(config.watch.poll_seconds)
    logging.info("watch: no new checkpoint for %.0f s; stopping", config.watch.idle_timeout_seconds)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    validate(config)
    workdir, export = flags.FLAGS.workdir, flags.FLAGS.export
    if (workdir is None) == (export is None):
        raise app.UsageError("give exactly one of --workdir (checkpoints) or --export (an exported file)")
    if flags.FLAGS.eval_dir:
        eval_dir = flags.FLAGS.eval_dir
    elif workdir:
        eval_dir = storage.join(workdir, "eval", config.name)
    else:
        raise app.UsageError("--export needs --eval_dir")
    storage.check_bucket(eval_dir, writable=True)  # before any checkpoint is read or feature extracted
    distributed.initialize()
    if export:
        print(evaluate(config, [encoders_lib.from_export(export)], eval_dir))
    elif flags.FLAGS.watch:
        watch(config, workdir, eval_dir)
    else:
        steps = _checkpoint_steps(config, workdir, flags.FLAGS.step)
        encoders = [encoders_lib.from_checkpoint(workdir, s, config.normalization) for s in steps]
        print(evaluate(config, encoders, eval_dir))
    if jax.process_index() == 0:
        print(f"results: {eval_dir}/results.md, results.csv, plots in {eval_dir}")


def run() -> None:
    """The command line: flags are defined here, not at import, so the CLIs can be imported together (tests)."""
    config_flags.DEFINE_config_file("config", None, "Eval config file (configs/eval_*.py), with :args.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Pretraining workdir whose checkpoints are evaluated.")
    flags.DEFINE_string("export", None, "Evaluate an exported encoder file instead of checkpoints.")
    flags.DEFINE_string("eval_dir", None, "Where results go (default WORKDIR/eval/<config.name>).")
    flags.DEFINE_integer("step", None, "Evaluate this checkpoint step (overrides config.checkpoints).")
    flags.DEFINE_bool("watch", False, "Evaluate every new checkpoint as training writes it.")
    app.run(main)


if __name__ == "__main__":
    run()
