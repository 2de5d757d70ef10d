#!/usr/bin/env bash
# Train FCOS R-50-FPN on COCO 2017 (README, "COCO"): the Linux twin of train_fcos.bat, same command.
# Needs COCO under DATASETS_ROOT (coco/annotations, coco/train2017, coco/val2017) and the seed's
# pretrained file in pretrained_weights/ (see pretrained_weights/README.md).
set -euo pipefail

# ---- The only lines to edit (or set them in the environment) ----
# The Python of the venv setup.sh made; in an activated conda environment use PYTHON=python.
PYTHON=${PYTHON:-.venv/bin/python}
DATASETS_ROOT=${DATASETS_ROOT:-$HOME/datasets}
# ------------------------------------------------------------------

cd "$(dirname "${BASH_SOURCE[0]}")"
export DETECTRON2_DATASETS=$DATASETS_ROOT

# One GPU, 2 images per batch: the config's 16-image learning rate scaled with it (0.01 * 2 / 16).
"$PYTHON" train_net.py \
  --config-file configs/fcos_R_50_FPN.yaml \
  SOLVER.IMS_PER_BATCH 2 SOLVER.BASE_LR 0.00125
