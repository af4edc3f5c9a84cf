#!/usr/bin/env bash
# FLUX.1-dev text-to-image with TaylorSeer (diffusers' FluxPipeline, unmodified). Overrides go to Hydra, e.g.
#   bash scripts/sample_flux.sh 'prompt="a red fox in the snow"' cache.max_order=2
#   bash scripts/sample_flux.sh prompt_file=prompts.txt compare_uncached=true
#   bash scripts/sample_flux.sh model.path=/data/FLUX.1-dev dtype=bfloat16 cpu_offload=true vae_tiling=true
#   bash scripts/sample_flux.sh model=flux_schnell        # or model=flux_kontext image=input.png
# All keys: configs/sample_flux.yaml. Outputs: runs/flux/<settings>/ (PNGs, config.yaml, metrics.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_flux.sample "$@"
