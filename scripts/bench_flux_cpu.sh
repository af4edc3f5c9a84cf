#!/usr/bin/env bash
# CPU wall-time benchmark of the FLUX cache (a benchmark, not a test: run it on an otherwise idle machine).
# FLUX-architecture transformer (4 double + 8 single blocks, hidden 256, 1024 image tokens), 50 steps:
# uncached, ours (N=6, warm-up 3, O=1/O=2), diffusers' TaylorSeer hook, and the ideal (blocks skipped).
#   bash scripts/bench_flux_cpu.sh [--rounds 3] [--threads 2] [--json runs/bench_flux_cpu.json]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_flux.bench_cpu "$@"
