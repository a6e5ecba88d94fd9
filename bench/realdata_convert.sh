#!/usr/bin/env bash
# Converts the real sets of ../shared/realdata for configs/cpu_realdata.py and configs/eval_realdata.py:
# the seven labelled sets (MedMNIST's four, NIH CXR as binary and 14-finding tasks, ISIC) and the one
# unlabelled CT volume (axial slices, pretraining only).
#   bench/realdata_convert.sh [REALDATA] [OUT]
# OUT (default /tmp/mermed_realdata) receives OUT/id.key and OUT/data/<dataset>/; nothing derived from
# the real images is written into the repository. Re-running resumes or reuses finished conversions.
set -euo pipefail
REAL=${1:-${MERMED_REALDATA:-$(dirname "$0")/../../shared/realdata}}
OUT=${2:-/tmp/mermed_realdata}
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
# Unlabelled: every slice goes to the training split (no evaluation set is drawn from it).
$PY -m data_pipelines.convert nifti "$REAL/ct_totalsegmentator_example/example_ct.nii.gz" --slice-stride 1 \
  --windows abdomen,lung,bone --dataset ct_totalseg "${common[@]}" --splits train=1.0
echo "converted into $DATA"
