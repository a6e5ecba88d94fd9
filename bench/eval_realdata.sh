#!/usr/bin/env bash
# Downstream benchmark on ../shared/realdata: convert the real sets, pretrain a tiny ViT on them for a
# few CPU minutes, then linear probe + kNN for that checkpoint, a random-init network and raw pixels.
#   bench/eval_realdata.sh [REALDATA] [OUT] [PRETRAIN_STEPS]
# OUT (default /tmp/mermed_realdata_eval) receives the converted data, the pretraining workdir and
# eval results (OUT/pretrain/eval/realdata/results.md); nothing is written into the repository.
set -euo pipefail
REAL=${1:-${MERMED_REALDATA:-$(dirname "$0")/../../shared/realdata}}
OUT=${2:-/tmp/mermed_realdata_eval}
STEPS=${3:-300}
PY=${PY:-.venv/bin/python}
DATA=$OUT/data
mkdir -p "$OUT"
[ -f "$OUT/id.key" ] || $PY -m data_pipelines.convert new-key "$OUT/id.key"
common=(--out "$DATA" --id-key-file "$OUT/id.key" --workers 2 --no-progress --splits train=0.7,val=0.15,test=0.15 --seed 42)
$PY -m data_pipelines.convert medmnist "$REAL"/medmnist/{breastmnist,pneumoniamnist,retinamnist,pathmnist_train1000}.npz "${common[@]}"
$PY -m data_pipelines.convert csv "$REAL/cxr_nih1000/labels.csv" --modality cxr --label-column binary_label \
  --split-column split --patient-column patient_id --dataset nih_binary "${common[@]}"
$PY -m data_pipelines.convert csv "$REAL/cxr_nih1000/labels.csv" --modality cxr --label-column nih_finding_labels \
  --multi-label --none-value "No Finding" --split-column split --patient-column patient_id --dataset nih14 "${common[@]}"
$PY -m data_pipelines.convert csv "$REAL/derm_isic_uda1/labels.csv" --modality derm --path-column image \
  --path-format "images/{}.jpg" --label-column benign_malignant --dataset isic "${common[@]}"
dirs="('$DATA/breastmnist','$DATA/pneumoniamnist','$DATA/retinamnist','$DATA/pathmnist_train1000','$DATA/nih_binary','$DATA/isic')"
XLA_FLAGS=--xla_force_host_platform_device_count=2 $PY -m mermed_jax.pretrain --config=configs/demo_cpu.py \
  --workdir="$OUT/pretrain" --config.data.dirs="$dirs" --config.max_steps="$STEPS" \
  --config.checkpoint.every_steps="$STEPS" --config.log_every_steps=50
XLA_FLAGS=--xla_force_host_platform_device_count=2 $PY -m mermed_jax.evaluate \
  --config=configs/eval_realdata.py:root="$DATA" --workdir="$OUT/pretrain"
