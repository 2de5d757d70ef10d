#!/usr/bin/env bash
# Draw FCOS detections on COCO val2017 images (README, "Image demo"): the Linux twin of
# demo_inference_fcos.bat, same command. Needs the seed's pretrained file in pretrained_weights/
# (see pretrained_weights/README.md). The pictures go to output/demo; the glob takes the val2017
# images whose id is below 1000.
set -euo pipefail

# ---- The only lines to edit (or set them in the environment) ----
# The Python of the venv setup.sh made; in an activated conda environment use PYTHON=python.
PYTHON=${PYTHON:-.venv/bin/python}
DATASETS_ROOT=${DATASETS_ROOT:-$HOME/datasets}
# ------------------------------------------------------------------

cd "$(dirname "${BASH_SOURCE[0]}")"

"$PYTHON" demo/demo.py \
  --config-file configs/fcos_R_50_FPN.yaml \
  --input "$DATASETS_ROOT/coco/val2017/000000000*.jpg" \
  --output output/demo \
  --confidence-threshold 0.5 \
  --opts MODEL.WEIGHTS pretrained_weights/FCOS_imprv_R_50_FPN_1x.pth
