#!/usr/bin/env bash
# MerMED-FM pretraining on a Cloud TPU VM pod slice: create the pod (or reuse it), copy this
# repository to every worker, install, and start the same command on all workers at once.
# JAX finds the other workers itself (distributed.initialize: TPU auto-detection), every worker
# reads its own share of the data, and checkpoints go to a bucket all workers can write.
#
#   TPU_NAME=mermed-v5p-64 ZONE=us-east5-a ACCELERATOR=v5p-64 \
#     launch/tpu_pod.sh --config=configs/mermed_vitb16.py --workdir=gs://my-bucket/mermed_b16 \
#       --config.data.dirs="('gs://my-bucket/shards/cxr', 'gs://my-bucket/shards/ct')" \
#       --config.mesh.shape="(1,-1,1)"
#
# Several slices (multislice): add --config.mesh.dcn_shape="(-1,1,1)" (FSDP inside a slice, data
# parallelism across slices over DCN; slices are found from the devices' slice_index).
# Variables: TPU_NAME, ZONE, ACCELERATOR (e.g. v4-32, v5p-64), RUNTIME (TPU software version,
# default v2-alpha-tpuv5), PROJECT (default: gcloud's), SPOT=1 for spot capacity,
# REMOTE_DIR (default ~/mermed-jax on the workers), SKIP_INSTALL=1 to reuse an installed venv.
# Arguments are passed to `python -m mermed_jax.pretrain` unchanged. Preemption: the job saves
# at the step all workers agree on and exits 0; run this script again to resume from the
# workdir (the pod is reused if it still exists, re-created otherwise).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-64}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
REMOTE_DIR="${REMOTE_DIR:-mermed-jax}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
repo="$(cd "$(dirname "$0")/.." && pwd)"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" "${project_flag[@]}"; }
on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

state="$(tpu describe "$TPU_NAME" --format='value(state)' 2>/dev/null || true)"
if [[ -z "$state" ]]; then
  echo "tpu_pod: creating $TPU_NAME ($ACCELERATOR, $RUNTIME) in $ZONE" >&2
  spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
elif [[ "$state" != READY ]]; then
  echo "tpu_pod: $TPU_NAME exists in state $state; delete it or wait until it is READY" >&2
  exit 1
else
  echo "tpu_pod: reusing $TPU_NAME" >&2
fi

echo "tpu_pod: copying the repository to all workers" >&2
archive="$(mktemp -t mermed.XXXXXX.tar.gz)"
trap 'rm -f "$archive"' EXIT
git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
tpu scp "$archive" "$TPU_NAME":/tmp/mermed.tar.gz --worker=all
on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/mermed.tar.gz -C ~/$REMOTE_DIR"

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  echo "tpu_pod: installing (jax[tpu] and requirements.txt) on all workers" >&2
  on_all_workers "cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip \
    && .venv/bin/pip install -q 'jax[tpu]' -r requirements.txt \
    && (sudo apt-get install -y -q libtcmalloc-minimal4 || echo 'tpu_pod: no TCMalloc; continuing without')"
fi

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
echo "tpu_pod: starting pretraining on all workers" >&2
on_all_workers "cd ~/$REMOTE_DIR && source launch/preload_tcmalloc.sh && .venv/bin/python -m mermed_jax.pretrain$args"
