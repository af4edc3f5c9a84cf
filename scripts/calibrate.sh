#!/usr/bin/env bash
# Calibrate a sampler for cache.schedule=calibrated (two uncached runs; writes a small JSON file).
#   bash scripts/calibrate.sh dit model=digits num_steps=50 cfg_scale=2.0
#   bash scripts/calibrate.sh flux model=digits_flux
#   bash scripts/calibrate.sh hunyuan_video model.path=/data/HunyuanVideo samples=100
# Then: cache.schedule=calibrated cache.budget=10 cache.calibration=<the file it printed>
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
family="${1:?usage: bash scripts/calibrate.sh dit|flux|hunyuan_video [key=value ...]}"
shift
case "$family" in
  dit) exec python -m taylorseer_dit.calibrate "$@" ;;
  flux) exec python -m taylorseer_flux.calibrate "$@" ;;
  hunyuan_video) exec python -m taylorseer_hunyuan_video.calibrate "$@" ;;
  *) echo "[calibrate] unknown family '$family': expected dit, flux or hunyuan_video" >&2; exit 2 ;;
esac
