#!/usr/bin/env bash
# Calibrate a sampler for cache.schedule=calibrated (two uncached runs; writes a small JSON file).
#   bash scripts/calibrate.sh dit model=digits num_steps=50 cfg_scale=2.0
#   bash scripts/calibrate.sh flux model=digits_flux
# Then: cache.schedule=calibrated cache.budget=10 cache.calibration=<the file it printed>
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
family="${1:?usage: bash scripts/calibrate.sh dit|flux [key=value ...]}"
shift
case "$family" in
  dit) exec python -m taylorseer_dit.calibrate "$@" ;;
  flux) exec python -m taylorseer_flux.calibrate "$@" ;;
  *) echo "[calibrate] unknown family '$family': expected dit or flux" >&2; exit 2 ;;
esac
