#!/usr/bin/env bash
# Build the metric environments that cannot share the core one (they pin old timm/transformers/numpy):
#
#   bash scripts/setup_eval_envs.sh imagereward   # .venv-imagereward: ImageReward-v1.0 (image-reward 1.5)
#   bash scripts/setup_eval_envs.sh vbench        # .venv-vbench: VBench 0.1.5 (+ detectron2 for 4 dimensions)
#   bash scripts/setup_eval_envs.sh all
#
# Each environment reuses the core environment's torch/torchvision through a .pth file (no second
# 5.5 GB torch): the packages of requirements eval/envs/<name>.txt are installed into the environment
# and shadow the core's versions there only. EVAL_ENV_OWN_TORCH=1 installs a separate torch instead.
# A rerun with unchanged requirements and core torch does nothing. The metric commands
# (`bash scripts/eval.sh imagereward|vbench ...`) call these environments; nothing else does.
#
# Environment variables: EVAL_ENV_ROOT (where the environments go; default: the repo root),
# EVAL_ENV_OWN_TORCH=1, VBENCH_SKIP_DETECTRON2=1 (skip the detectron2 build that object_class,
# multiple_objects, color and spatial_relationship need).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"   # the core environment (.venv), activated
cd "$ROOT"
ENV_ROOT="${EVAL_ENV_ROOT:-$ROOT}"
CORE_PY="$(command -v python)"

usage() { echo "usage: bash scripts/setup_eval_envs.sh [imagereward|vbench|all]" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in
  imagereward) names=(imagereward) ;;
  vbench) names=(vbench) ;;
  all) names=(imagereward vbench) ;;
  *) usage ;;
esac

# The site-packages folder that holds the core torch (the core .venv may itself reach it through a .pth).
TORCH_SITE="$("$CORE_PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
TORCH_VERSION="$("$CORE_PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
BASE_PY="$("$CORE_PY" -c 'import sys; print(sys._base_executable)')"

build() {
  local name="$1" venv="$ENV_ROOT/.venv-$1" reqs="$ROOT/eval/envs/$1.txt"
  local key stamp start site
  key="$( (cat "$reqs"; echo "$TORCH_VERSION ${EVAL_ENV_OWN_TORCH:-0} $TORCH_SITE") | sha1sum | cut -c1-12)"
  stamp="$venv/.built-$key"
  if [ -f "$stamp" ]; then
    echo "[setup_eval_envs] $venv is up to date ($(du -sh "$venv" | cut -f1))"
    return 0
  fi
  start=$(date +%s)
  echo "[setup_eval_envs] building $venv from eval/envs/$name.txt" >&2
  rm -rf "$venv"
  # Same interpreter as the core: a .pth can only share compiled packages (torch) with the same Python.
  "$BASE_PY" -m venv "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ "${EVAL_ENV_OWN_TORCH:-0}" = "1" ]; then
    "$venv/bin/python" -m pip install -q "torch==${TORCH_VERSION%% *}" "torchvision==${TORCH_VERSION##* }" >&2
  else
    # Appended after the environment's own site-packages: the pinned packages installed here win.
    echo "$TORCH_SITE" > "$site/_taylorseer_core_packages.pth"
  fi
  "$venv/bin/python" -m pip install -q --upgrade "pip<26" >&2
  "$venv/bin/python" -m pip install -q -r "$reqs" >&2
  if [ "$name" = vbench ] && [ "${VBENCH_SKIP_DETECTRON2:-0}" != "1" ]; then
    # GRiT (object_class, multiple_objects, color, spatial_relationship) needs detectron2, which is
    # only published as source on GitHub; it builds against the environment's torch (~5-10 min).
    if ! timeout 1800 "$venv/bin/python" -m pip install -q --no-build-isolation \
        "detectron2@git+https://github.com/facebookresearch/detectron2.git" >&2; then
      echo "[setup_eval_envs] warning: detectron2 could not be installed (it builds from GitHub source); VBench's" \
           "object_class, multiple_objects, color and spatial_relationship will fail until it is:" \
           "$venv/bin/pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'" >&2
    fi
  fi
  # The runner's self-check: the package imports and the protocol answers (no weights needed).
  "$venv/bin/python" "$ROOT/eval/runners/run_$name.py" --check >&2
  touch "$stamp"
  echo "[setup_eval_envs] built $venv in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1) on disk"
}

for name in "${names[@]}"; do
  build "$name"
done
