#!/usr/bin/env bash
# One-command install of fcos-d2, then the project's main job on the embedded dataset.
#
#   bash setup.sh                  # install (or check) everything, then run scripts/run_embedded.sh
#   bash setup.sh --install-only   # install only (what CI runs); same as FCOS_SKIP_MAIN_JOB=1
#
# Steps: create the venv, install the pins of requirements.txt, build detectron2 0.6 from the
# pb1-detectron2 sdist (tools/install_detectron2.py), install this checkout's `fcos` package
# (editable), check that detectron2 imports, run the main job. Each step skips what is already done, so a second run is quick and changes nothing.
#
# Environment:
#   PYTHON=python3.11        interpreter used to create the venv (must be Python 3.11)
#   FCOS_VENV=<dir>          venv location (default: .venv in this directory)
#   FCOS_SKIP_MAIN_JOB=1     do not run the main job (like --install-only)
#   FCOS_DETECTRON2_SOURCE=<dir>  install detectron2 from this source checkout (e.g. a git clone of
#                            main) instead of the 0.6 sdist, without compiling its C++ extension
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python_cmd=${PYTHON:-python3.11}
venv=$(realpath -m "${FCOS_VENV:-$repo/.venv}")
detectron2_source=${FCOS_DETECTRON2_SOURCE:+$(realpath -m "$FCOS_DETECTRON2_SOURCE")}
cd "$repo"
skip_main_job=${FCOS_SKIP_MAIN_JOB:-0}
cache_dir=$repo/.install-cache

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'status=$?; printf "setup.sh: FAILED (exit %s) at line %s: %s\n" "$status" "$LINENO" "$BASH_COMMAND" >&2' ERR

for arg in "$@"; do
  case $arg in
    --install-only) skip_main_job=1 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (known: --install-only, --help)" ;;
  esac
done

step "Python venv at $venv"
if [[ -x $venv/bin/python ]]; then
  echo "exists, keeping it"
elif [[ -e $venv ]]; then
  die "$venv exists but has no bin/python; remove it or set FCOS_VENV to another directory"
else
  command -v "$python_cmd" >/dev/null || die "'$python_cmd' not found; set PYTHON to a Python 3.11 interpreter"
  "$python_cmd" -m venv "$venv"
  echo "created with $("$venv/bin/python" --version)"
fi
py=$venv/bin/python
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$venv uses $("$py" --version 2>&1); the pinned stack needs Python 3.11 (set PYTHON, or FCOS_VENV to a new directory)"

step "Pinned packages from requirements.txt"
# Lists every "name==version" line whose installed version differs (a local label such as +cu130
# matches, as it does for pip), so an up-to-date venv skips pip entirely.
unmet=$("$py" - requirements.txt <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1], encoding="utf-8"):
    requirement = line.split("#", 1)[0].strip()
    if not requirement:
        continue
    name, _, pinned = requirement.partition("==")
    try:
        installed = version(name).split("+", 1)[0]
    except PackageNotFoundError:
        installed = "missing"
    if installed != pinned:
        print(f"{requirement} (installed: {installed})")
PY
)
if [[ -z $unmet ]]; then
  echo "all pins already installed"
else
  printf 'to install:\n%s\n' "$unmet"
  "$py" -m pip install -r requirements.txt
fi

if [[ -n $detectron2_source ]]; then
  step "detectron2 from the checkout $detectron2_source"
  "$py" tools/install_detectron2.py --source "$detectron2_source" --cache-dir "$cache_dir"
else
  step "detectron2 0.6"
  "$py" tools/install_detectron2.py --cache-dir "$cache_dir"
fi

step "The fcos package (editable install of this checkout)"
# Idempotent: skipped when `import fcos` from another directory already resolves to this checkout.
installed_at=$(cd / && "$py" -c 'import os, fcos; print(os.path.dirname(os.path.dirname(os.path.abspath(fcos.__file__))))' 2>/dev/null || true)
if [[ $installed_at == "$repo" ]]; then
  echo "already installed from $repo"
else
  "$py" -m pip install --no-deps --no-build-isolation -e "$repo"
fi

step "Check that detectron2 imports"
"$py" - <<'PY' || die "detectron2 is installed but does not import; see the traceback above"
import detectron2, detectron2.data, detectron2.engine, detectron2.evaluation, detectron2.modeling
from detectron2.utils.collect_env import collect_env_info

print(collect_env_info())
PY

if [[ $skip_main_job == 1 ]]; then
  step "Main job skipped (--install-only / FCOS_SKIP_MAIN_JOB=1)"
elif [[ -f scripts/run_embedded.sh ]]; then
  step "Main job: scripts/run_embedded.sh"
  FCOS_VENV=$venv bash scripts/run_embedded.sh
else
  step "Main job: scripts/run_embedded.sh does not exist yet, nothing to run"
fi

step "Done. Run the tests with: $venv/bin/python -m pytest"
