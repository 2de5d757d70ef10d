#!/usr/bin/env bash
# The embedded job, end to end with no downloads: generate the synthetic shapes dataset on first
# use, train FCOS on it from scratch, evaluate on its val split, print the AP table and the wall
# time. The recipe follows the hardware, and the script says which ran: on a CPU with native bf16
# (AMX-BF16, AVX512-BF16) configs/fcos_shapes_bf16.yaml trains and evaluates in bfloat16 and spends
# the time saved on resolution and iterations; elsewhere (GPU, or a CPU without native bf16)
# configs/fcos_shapes.yaml trains in fp32. Outputs go to output/fcos_shapes (config.yaml, log.txt, metrics.json, checkpoints,
# training_curves.png, TensorBoard events).
#
#   bash scripts/run_embedded.sh                         # as setup.sh runs it
#   bash scripts/run_embedded.sh OUTPUT_DIR output/try2   # extra arguments go to train_net.py as config opts
#
# Environment: FCOS_VENV (virtualenv to use, default .venv), FCOS_NUM_PROCESSES (training processes;
# default 1 with a GPU, 2 on a CPU-only machine: two single-threaded gloo processes use two cores
# better than one process with two threads, which collapses when another job holds a core),
# FCOS_CONFIG (the config file; default chosen as above).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=${FCOS_VENV:-.venv}
py=$venv/bin/python
if [[ ! -x $py ]]; then
  echo "run_embedded.sh: $py not found; run 'bash setup.sh' first (or set FCOS_VENV)" >&2
  exit 1
fi

processes=${FCOS_NUM_PROCESSES:-}
if [[ -z $processes ]]; then
  if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    processes=1
  else
    processes=2
  fi
fi

config=${FCOS_CONFIG:-}
if [[ -z $config ]]; then
  # Prints the native bf16 feature (e.g. AMX-BF16) and exits 0 on a GPU-less CPU that has one.
  probe='import sys, torch
from fcos.precision import native_cpu_support
found = None if torch.cuda.is_available() else native_cpu_support(torch.bfloat16)
print(found or "")
sys.exit(0 if found else 1)'
  if native=$("$py" -W ignore::FutureWarning -c "$probe"); then
    config=configs/fcos_shapes_bf16.yaml
    echo "run_embedded.sh: this CPU has native bf16 ($native): bfloat16 recipe $config"
  else
    config=configs/fcos_shapes.yaml
    echo "run_embedded.sh: no CPU with native bf16 here (or a GPU is used): fp32 recipe $config"
  fi
fi

start=$(date +%s)
"$py" train_net.py --config-file "$config" \
  --num-gpus "$processes" --dist-url auto "$@"
elapsed=$(( $(date +%s) - start ))
printf 'Embedded job finished in %dm%02ds (dataset generation if needed + training + evaluation, %s process(es)).\n' \
  $((elapsed / 60)) $((elapsed % 60)) "$processes"
echo "run_embedded.sh: recipe $config"
