#!/usr/bin/env bash
# DiT class-conditional sampling with TaylorSeer. Overrides go to Hydra, e.g.
#   bash scripts/sample_dit.sh cache.interval=4 cache.max_order=2 compare_uncached=true
#   bash scripts/sample_dit.sh model=dit_xl_2_512 model.checkpoint=/data/DiT-XL-2-512x512.pt
# 50k-sample FID runs: bash scripts/sample_dit_ddp.sh (torchrun, one process per GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_dit.sample "$@"
