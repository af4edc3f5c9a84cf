#!/usr/bin/env bash
# Retrain the bundled digits FLUX pipeline (VAE, then transformer) into assets/digits_flux/. Resumes after a
# kill (assets/digits_flux.resume.pt). One thread at low priority: the machine may be shared.
#   bash scripts/train_digits_flux.sh                       # ~1-2 h on one CPU core
#   bash scripts/train_digits_flux.sh steps=8000 batch_size=128
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 exec nice -n 10 python -m taylorseer_flux.digits "$@"
