#!/usr/bin/env bash
# The main job on the bundled default: no cache vs FORA vs TaylorSeer on the bundled digits DiT (CPU).
#   bash scripts/demo.sh                     # table + side-by-side grid + plots under runs/demo/
#   bash scripts/demo.sh num_samples=500 intervals=[5] orders=[1,2,3]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_dit.demo "$@"
