#!/usr/bin/env bash
# Wall speedup vs FLOPs compression on a mid-size random-weight DiT (run on a quiet machine).
#   bash scripts/bench_dit_cpu.sh --model DiT-B/2 --repeats 3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_dit.bench_cpu "$@"
