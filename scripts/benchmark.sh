#!/usr/bin/env bash
# CPU wall-time benchmark of the cache on all three models, variants alternated in one process
# (a benchmark, not a test: run it on an otherwise idle machine).
#   bash scripts/benchmark.sh [--models dit flux hunyuan_video] [--rounds 3] [--json out.json] [--markdown out.md]
#   bash scripts/benchmark.sh --kernels addcmul inductor      # compare the forecast kernels
#   bash scripts/benchmark.sh --smoke                         # tiny sizes, 1 round: checks that it runs
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_eval.benchmark "$@"
