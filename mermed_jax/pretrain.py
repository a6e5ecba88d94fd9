r"""MerMED-FM pretraining: config -> mesh -> data -> state -> loop, resumable at any step.

  python -m mermed_jax.pretrain --config=configs/demo_cpu.py --workdir=/tmp/mermed_demo \
      --config.data.dirs="('demo_data/demo_ct', 'demo_data/demo_cxr')" --config.max_steps=200

The workdir holds config.json (the resolved config), run.json (the run record), checkpoints/
(Orbax: state, Grain iterator per host, meta), metrics/ (JSON-lines parts, read with
metric_writers.read_metrics) and TensorBoard events, and profiler traces. It is a local path, a
shared or gcsfuse-mounted filesystem, or a gs:// bucket (not s3://: Orbax cannot write there; the
job refuses it before compiling). Starting a job on a workdir with checkpoints resumes from the
latest complete one. SIGTERM (or a TPU preemption notice) makes every host save at the same step
boundary and exit 0.
"""

import json
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from clu import parameter_overview, periodic_actions
from ml_collections import config_flags

from data_pipelines import pipeline, storage
from mermed_jax import distributed, sharding
from mermed_jax.models import networks
from mermed_jax.recipe.validation import validate_config
from mermed_jax.ssl.schedules import build_schedules
from mermed_jax.training import (
    checkpointing,
    flops,
    init_from_pretrained,
    metric_writers,
    profiling,
    run_record,
    train_state,
    train_step,
)


class NonFiniteTrainingError(RuntimeError):
    """Too many updates were skipped for non-finite loss or gradients."""


def _progress_bar(total: int, start: int):
    if not sys.stderr.isatty() or jax.process_index() > 0:
        return None
    import tqdm  # only when a person is watching

    return tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def train(config, workdir: str | os.PathLike) -> dict[str, float]:
    """Runs (or resumes) the job; returns the last logged metrics."""
    workdir = os.fspath(workdir)
    # ------------------------------------------------------------------ setup
    checkpointing.check_workdir(workdir)  # seconds, where a bad location would fail after the compile
    validate_config(config, devices=jax.devices())
    if not config.data.dirs:
        raise ValueError("data.dirs: no dataset directories given (see data_pipelines/convert.py)")
    if jax.process_index() == 0:
        storage.makedirs(workdir)
        storage.write_text(storage.join(workdir, checkpointing.CONFIG_FILE), config.to_json_best_effort(indent=2))
    mesh = sharding.mesh_from_config(config.mesh)
    logging.info("mesh %s; the process of each device: %s", dict(mesh.shape),
                 np.vectorize(lambda d: d.process_index)(mesh.devices).tolist())
    # The input statistics and the run's length: fixed at the first start, kept on resume.
    resuming = bool(checkpointing.complete_steps(checkpointing.checkpoint_dir(workdir)))
    record = run_record.settle(workdir, config, resuming=resuming)
    total_steps = record.total_steps
    stop_at = min(total_steps, config.max_steps or total_steps)
    schedules = build_schedules(config, record.steps_per_epoch)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))

    # ------------------------------------------------------------------ data
    data_config = pipeline.TrainConfig.from_config(
        config.data, global_batch=config.global_batch, crops=config.crops, seed=config.seed
    )
    data_iterator = pipeline.train_iterator(data_config)
    pixel_mean, pixel_std = record.stats()
    host_batch = config.global_batch // jax.process_count()

    # ------------------------------------------------------------------ state
    make_state = lambda: train_state.init_train_state(config, init_rng)  # noqa: E731
    abstract_boxed = jax.eval_shape(make_state)
    state_shardings = sharding.logical_shardings(abstract_boxed, mesh)
    manager = checkpointing.make_manager(workdir, config.checkpoint)
    meta = {
        "seed": config.seed,
        "rng_key": np.asarray(jax.random.key_data(step_rng)).tolist(),
        "process_count": jax.process_count(),
        "host_batch": host_batch,
    }
    latest = manager.latest_step()
    if latest is None:
        state, _ = sharding.create_sharded(make_state, mesh)
        start_step = 0
        if config.init_checkpoint:  # the official recipe starts from ImageNet DINO weights
            state, _ = init_from_pretrained.initialize_from_pretrained(state, config)
            state = jax.device_put(state, state_shardings)
    else:
        abstract = checkpointing.abstract_with_shardings(nn.unbox(abstract_boxed), state_shardings)
        restored = checkpointing.restore(manager, latest, abstract, data_iterator, meta)
        state, start_step = restored.state, int(restored.state.step)
        if not restored.data_restored:
            data_iterator = pipeline.train_iterator(data_config, start_step=start_step)
        logging.info("resumed from step %d", start_step)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params, msg="student parameters")

    # ------------------------------------------------------------------ compile
    step_fn = train_step.jit_train_step(
        train_step.make_train_step(config, pixel_mean, pixel_std, mesh=mesh),
        mesh, state_shardings,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    compile_start = time.perf_counter()
    compiled_step = step_fn.lower(state, train_step.abstract_batch(config, batch_sharding), step_rng,
                                  schedules.at(start_step)).compile()
    logging.info("train step compiled in %.1f s", time.perf_counter() - compile_start)
    distributed.barrier("train_step_compiled")  # every host starts stepping together
    flops_by_part = flops.step_flops(config, networks.backbone_config(config, teacher=False))
    flops_per_step = sum(flops_by_part.values())
    peak = flops.peak_flops_per_device(config)
    logging.info("model FLOPs per step: %.3g (%s)", flops_per_step, {k: f"{v:.3g}" for k, v in flops_by_part.items()})

    # ------------------------------------------------------------------ loop
    writer = metric_writers.make_writer(workdir, start_step=start_step, flush_seconds=config.log_flush_seconds)
    hooks = [periodic_actions.ReportProgress(num_train_steps=stop_at, writer=writer, every_steps=config.log_every_steps)]
    if config.profile.every_steps and jax.process_index() == 0:
        hooks.append(profiling.profile_hook(workdir, config.profile))
    bar = _progress_bar(stop_at, start_step)
    last_logged: dict[str, float] = {}
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

    def nonfinite_streak(at_step: int) -> int:
        """Consecutive skipped updates (one host sync); raises once there are too many."""
        streak = int(state.nonfinite_streak)
        if streak >= config.max_skipped_steps:
            manager.wait_until_finished()
            raise NonFiniteTrainingError(
                f"step {at_step}: the last {streak} updates were skipped for non-finite loss or gradients "
                f"(max_skipped_steps={config.max_skipped_steps}); stopping. The last good checkpoint is "
                f"step {manager.latest_step()}, untouched."
            )
        return streak

    step = start_step
    preempted = False
    try:
        while step < stop_at:
            wait_start = time.perf_counter()
            host_batch = next(data_iterator)
            data_wait += time.perf_counter() - wait_start
            batch = sharding.to_global(host_batch, batch_sharding)
            state, step_metrics = compiled_step(state, batch, step_rng, schedules.at(step))
            step += 1
            window_steps += 1
            for hook in hooks:
                hook(step)
            if bar is not None:
                bar.update(1)

            if step % config.log_every_steps == 0 or step == stop_at:
                nonfinite_streak(step)
                scalars = metric_writers.host_scalars(step_metrics)
                elapsed = time.perf_counter() - window_start
                scalars.update(flops.throughput_metrics(flops_per_step, elapsed / window_steps, config.global_batch, peak))
                scalars.update({f"data/{k}": v for k, v in data_iterator.metrics().items()})
                # The loader keeps up when this stays near 0: the step runs while the next batch loads.
                scalars["data/wait_fraction"] = data_wait / elapsed
                scalars["skipped_steps"] = float(state.skipped_steps)
                writer.write_scalars(step, scalars)
                last_logged = scalars
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0

            preempted = manager.reached_preemption(step)
            if preempted or step % config.checkpoint.every_steps == 0 or step == stop_at:
                if nonfinite_streak(step) and not preempted:
                    logging.warning("step %d: not saving in the middle of skipped non-finite updates", step)
                else:
                    checkpointing.save(manager, step, state, data_iterator, meta)
            if preempted:
                logging.warning("preemption notice: saved step %d, exiting", step)
                break

        manager.wait_until_finished()
    except BaseException:
        # What was logged reaches the workdir, also when the loop raised; but a metrics write that
        # fails now (the storage outage that may have caused the loop's error) must not replace it.
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001 - logged; the loop's error is the one raised
            logging.error("metrics not all written while stopping on an error (%s)", storage.first_line(e))
        raise
    try:
        writer.close()  # the end of the job: a metrics write that still fails is raised here
    finally:
        manager.close()
    if bar is not None:
        bar.close()
    return {**last_logged, "step": float(step), "preempted": float(preempted)}


class _QuietLibraries(logging.Filter):
    """Drops the INFO chatter of Orbax and TensorStore (dozens of lines per save)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
    del argv
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    distributed.initialize()
    summary = train(flags.FLAGS.config, flags.FLAGS.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: summary[k] for k in ("step", "loss", "preempted") if k in summary}))


def run() -> None:
    """The command line: flags are defined here, not at import, so the CLIs can be imported together (tests)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py), with :args.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and the resolved config go.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
