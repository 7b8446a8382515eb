#!/usr/bin/env bash
# The whole pipeline on brain-realistic synthetic subjects, on the CPU:
# make subjects -> preprocess with DIPY -> train the bundle -> evaluate on held-out subjects.
# Every step is an ordinary command a researcher runs on real data (see the bundle's docs).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=bundles/iqt_espcn_rn
# Two threads per process, whatever the machine: the figures in the README were measured so.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1/4 synthetic MNI152 subjects (HCP grid at 1.25 mm, axial slab z=40..99, 288 volumes): 4 train, 2 validation, 2 test -> demo/raw"
python -m preprocessing synthetic --anatomy mni152 --slab 40 100 --out demo/raw --count 8 --seed 0

echo "== 2/4 preprocessing: block-mean downsampling x2 and DIPY tensor fits -> demo/preprocessed"
python -m preprocessing hcp --hcp-root demo/raw --out demo/preprocessed --workers 1 --no-progress

echo "== 3/4 training ESPCN on synth000-003, validated on synth004-005 (synth006-007 held out) -> $BUNDLE/models"
python -m monai.bundle run --config_file "$BUNDLE/configs/train.json" --bundle_root "$BUNDLE" \
  --dataset_dir demo/preprocessed --overwrite true \
  --subjects "['synth000','synth001','synth002','synth003']" \
  --validation_subjects "['synth004','synth005']" --num_revnet_blocks 0 \
  --learning_rate 0.001 --lr_decay 0.9 --patches_per_subject 1000 --epochs 8 --num_restarts 1

echo "== 4/4 evaluation on the test subjects synth006-007 -> demo/evaluation"
python -m monai.bundle run --config_file "$BUNDLE/configs/evaluate.json" --bundle_root "$BUNDLE" \
  --dataset_dir demo/preprocessed --subjects "['synth006','synth007']" --output_dir demo/evaluation
