#!/usr/bin/env bash
# Retrain the bundled digits models (classifier, then DiT) into assets/. Resumes after a kill.
#   bash scripts/train_digits.sh steps=6000
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_dit.digits "$@"
