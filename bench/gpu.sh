#!/usr/bin/env bash
# ViT-B/16 MerMED-FM train step on one lent GPU (H200), in each precision policy: images/s, MFU,
# peak memory (issues 7 and 15).
#
# The device image has Python 3.12 with jax (CUDA), flax, optax, orbax, absl-py and PyYAML, but no
# ml_collections (needed by mermed_jax.recipe and the train step), grain, clu, OpenCV or
# tensorflow, and no package registry. bench/train_step.py's import path has none of grain, clu,
# OpenCV or tensorflow (tests/test_import_paths.py checks it), so only ml_collections travels, as a
# wheel in .whl/ (git-ignored). With no registry to build the project, the checkout is put on
# PYTHONPATH instead of `pip install -e .`.
#
# Prepare here, once (from the repo root):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform any -d .whl ml_collections==1.1.0
# Run through the device tool with carry [".whl"] and a timeout of about 540 s:
#   bash bench/gpu.sh
# Budget per policy: compile ~1-2 min, 1 warm-up + 10 timed steps of ~0.3-0.5 s, two matmul peaks;
# the parts only for mixed (the paper config's policy); about 8 minutes in all. Results: stdout and
# $OUT/gpu_train_step_b16_<policy>.json (when $OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 -c 'import sys, jax, flax, optax, ml_collections; print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, jax.devices())'
# XLA on GPU preallocates 75% by default; peak_bytes_in_use is measured either way.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 200 python3 bench/train_step.py --variant B/16 --batch 128 --precision mixed --steps 10 --parts \
  --peak-size 8192 --json "$out/gpu_train_step_b16_mixed.json" || echo "B/16 mixed timed out"
for policy in bfloat16 float32; do
  timeout 140 python3 bench/train_step.py --variant B/16 --batch 128 --precision $policy --steps 10 \
    --peak-size 8192 --json "$out/gpu_train_step_b16_$policy.json" || echo "B/16 $policy skipped or timed out"
done
