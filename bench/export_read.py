"""What exporting or evaluating a ViT-B/16 run reads: the teacher alone (checkpointing.load_teacher,
a partial Orbax restore) against the whole train state (checkpointing.load_train_state: student,
teacher, Adam moments, memory queue).

Writes a checkpoint of configs/mermed_vitb16.py's initial state with noise on every float (1.6 GB:
float32 params, Adam moments, memory of 131,072 x 256; 1.5 GB on disk, removed unless --keep)
through the job's own manager, unless --workdir already holds one, then runs each mode in a fresh
process (jax and the project are imported there, never in the parent) and prints one JSON line: the teacher backbone's and the whole state's
bytes, the checkpoint's bytes on disk, and per mode the peak RSS (getrusage), the RSS before the
load (the imports), the bytes TensorStore read from files and the seconds of the load.
"baseline" builds the abstract state both loads start from, and restores nothing; "export" is
`python -m mermed_jax.export --workdir=... --format=safetensors`. Runs on the CPU (JAX_PLATFORMS=cpu).

Usage:
  .venv/bin/python bench/export_read.py [--workdir /tmp/mermed_export_read] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mermed_vitb16.py"
STEP = 1
MODES = ("baseline", "teacher", "full", "export")  # each in a fresh process


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _file_bytes_read() -> int:
    import tensorstore as ts  # noqa: PLC0415 - Orbax's reader; imported with it

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def load(workdir: pathlib.Path, mode: str) -> dict:
    """One mode, in this (fresh) process: what it costs on top of the imports."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415

    from mermed_jax import export  # noqa: PLC0415
    from mermed_jax.training import checkpointing, train_state  # noqa: PLC0415

    config = checkpointing.load_config(workdir)
    before, start = _peak_rss(), time.perf_counter()
    if mode == "teacher":
        tree, _, _ = checkpointing.load_teacher(workdir, STEP)
    elif mode == "full":
        tree, _, _ = checkpointing.load_train_state(workdir, STEP)
    elif mode == "export":  # the whole command: teacher, safetensors in timm's names, config JSON
        tree = None
        export.export_workdir(workdir, workdir / "export" / "teacher.safetensors", "safetensors", STEP)
    else:  # the abstract state both loads build first, and no restore
        tree = nn.unbox(jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0))))
    jax.block_until_ready(tree)
    return {"peak_rss": _peak_rss(), "rss_before_load": before, "file_bytes_read": _file_bytes_read(),
            "seconds": round(time.perf_counter() - start, 2)}


def write_checkpoint(workdir: pathlib.Path) -> None:
    """The job's checkpoint of a fresh ViT-B/16 state (its values do not matter here, its layout does)."""
    import flax.linen as nn  # noqa: PLC0415
    import grain  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415

    from mermed_jax.recipe.arguments import load_config_file  # noqa: PLC0415
    from mermed_jax.training import checkpointing, run_record, train_state  # noqa: PLC0415

    config = load_config_file(CONFIG, None)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())
    run_record.settle(workdir, config, resuming=False)  # official pixel statistics, for the export
    state = nn.unbox(train_state.init_train_state(config, jax.random.key(0)))
    # A trained state's values do not compress (fresh Adam moments are zeros, which would): noise on every float.
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(treedef, [
        x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
        for x, k in zip(leaves, keys)])
    options = ml_collections.ConfigDict({"keep": 1, "keep_period": None, "async_save": False})
    manager = checkpointing.make_manager(workdir, options)
    checkpointing.save(manager, STEP, state, iter(grain.MapDataset.range(10).to_iter_dataset()), {"seed": 0})
    manager.wait_until_finished()
    manager.close()


def sizes(workdir: pathlib.Path) -> dict:
    """Bytes of the teacher backbone and of the whole state (from shapes), and of the checkpoint on disk."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415

    from mermed_jax.training import checkpointing, train_state  # noqa: PLC0415

    config = checkpointing.load_config(workdir)
    abstract = nn.unbox(jax.eval_shape(lambda: train_state.init_train_state(config, jax.random.key(0))))

    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    state_dir = workdir / "checkpoints" / str(STEP) / "state"
    return {"teacher_backbone_bytes": nbytes(abstract.teacher_params["backbone"]), "state_bytes": nbytes(abstract),
            "checkpoint_bytes_on_disk": sum(p.stat().st_size for p in state_dir.rglob("*") if p.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/mermed_export_read"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (1.5 GB) for another run")
    parser.add_argument("--mode", choices=("prepare", *MODES), help=argparse.SUPPRESS)  # a child's one job
    args = parser.parse_args()
    if args.mode == "prepare":
        if not (args.workdir / "checkpoints" / str(STEP)).is_dir():
            write_checkpoint(args.workdir)
        print(json.dumps(sizes(args.workdir)))
    elif args.mode:
        print(json.dumps(load(args.workdir, args.mode)))
    else:
        # This process imports nothing heavy and only starts the others: Linux keeps ru_maxrss across
        # fork and exec, so a child of the process that wrote the state would report its peak.
        result = {"config": CONFIG.name}
        for mode in ("prepare", *MODES):
            done = subprocess.run([sys.executable, __file__, f"--workdir={args.workdir}", f"--mode={mode}"],
                                  capture_output=True, text=True, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if done.returncode:
                raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
            out = json.loads(done.stdout.strip().splitlines()[-1])
            result.update(out) if mode == "prepare" else result.update({mode: out})
        if not args.keep:
            shutil.rmtree(args.workdir)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
