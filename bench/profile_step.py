"""Where the train step's time goes: one step under jax.profiler, summarised by XLA op kind.

Compiles the same step as bench/train_step.py (same flags), runs it once to warm up, traces the
next `--steps` steps, and prints the busy time of each kind of XLA:CPU thunk (ynn_fusion: the
dots, run by YNNPACK; copy/transpose fusions: layout changes; convolution; ...) with its share,
the wall time, and how busy the executor threads were (busy thread-seconds / threads x wall).
On this CPU it found the patch embedding's convolution gradient, run as a naive loop, taking 60%
of a ViT-S/16 step (BENCHMARKS.md).

Usage:
  .venv/bin/python bench/profile_step.py --variant S/16 --batch 8 --precision mixed [--trace-dir DIR]
"""

from __future__ import annotations

import collections
import glob
import re
import sys
import tempfile
import time

import jax
import train_step as bench  # bench/train_step.py: flags, config and the compiled step

_EXECUTOR_EVENTS = ("ThunkExecutor", "SlinkyThreadPool")


def op_kind_seconds(trace_dir: str) -> tuple[dict[str, float], dict[str, int], int]:
    """Busy seconds and counts per op kind (name without its numeric suffix) on XLA's threads."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    seconds, counts, threads = collections.Counter(), collections.Counter(), set()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            threads.add(line.name)
            for event in line.events:
                if event.name.startswith(_EXECUTOR_EVENTS):
                    continue
                kind = re.sub(r"[.\d]+$", "", event.name)
                seconds[kind] += event.duration_ns / 1e9
                counts[kind] += 1
    return dict(seconds), dict(counts), len(threads)


def main(argv: list[str] | None = None) -> None:
    parser = bench.argument_parser()
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary directory)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    compiled, state, batch, rng, hparams = bench.compile_step(bench.build(args))
    state, metrics = compiled(state, batch, rng, hparams)
    jax.block_until_ready(metrics)

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="mermed_profile_")
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, rng, hparams)
        jax.block_until_ready((state.step, metrics))
    wall = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()

    seconds, counts, threads = op_kind_seconds(trace_dir)
    busy = sum(seconds.values()) / args.steps
    print(f"{args.variant} batch {args.batch} {args.precision}: {wall:.2f} s/step wall, {busy:.2f} busy thread-s/step "
          f"on {threads} executor threads ({busy / (max(threads, 1) * wall):.0%} busy); trace in {trace_dir}")
    print(f"{'op kind':32s} {'s/step':>8s} {'share':>6s} {'calls':>7s}")
    for kind, total in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{kind:32s} {total / args.steps:8.3f} {total / args.steps / busy:6.1%} {counts[kind] // args.steps:7d}")


if __name__ == "__main__":
    sys.exit(main())
