#!/usr/bin/env bash
# FLOPs of the full-size models on the meta device (CPU, no weights): uncached vs TaylorSeer.
#   bash scripts/count_flops.sh [dit-xl-2-256|dit-xl-2-512|flux-dev|hunyuan-video ...] [--interval N --order O --warmup W --json]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_eval.count_flops "$@"
