#!/usr/bin/env bash
# The GPU benchmark (one GPU, no network, under 8 minutes): full-size DiT-XL/2, FLUX.1-dev and HunyuanVideo
# (17 frames) with random bf16 weights, 50 steps: uncached, ours O=1/O=2, the ideal, diffusers' hook, with
# and without taylorseer.compile, with each attention backend that runs there. Needs torch + diffusers only:
# no project install, no Hydra (the repo's folders are mapped onto their package names below).
#   bash scripts/bench_gpu.sh --out runs/bench_gpu [--budget-s 450] [--models dit flux hunyuan_video]
#   bash scripts/bench_gpu.sh --dry-run --out /tmp/bench_gpu      # tiny models on a CPU: every code path
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
PKGS="$(mktemp -d)"
trap 'rm -rf "$PKGS"' EXIT
ln -s "$ROOT/taylorseer" "$PKGS/taylorseer"
ln -s "$ROOT/TaylorSeer-DiT" "$PKGS/taylorseer_dit"
ln -s "$ROOT/TaylorSeer-FLUX" "$PKGS/taylorseer_flux"
ln -s "$ROOT/TaylorSeer-HunyuanVideo" "$PKGS/taylorseer_hunyuan_video"
ln -s "$ROOT/eval" "$PKGS/taylorseer_eval"
export PYTHONPATH="$PKGS${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -m taylorseer_eval.bench_gpu "$@"
