#!/usr/bin/env bash
# FLUX.1-dev text-to-image with TaylorSeer (diffusers' FluxPipeline, unmodified). Overrides go to Hydra, e.g.
#   bash scripts/sample_flux.sh 'prompt="a red fox in the snow"' cache.max_order=2
#   bash scripts/sample_flux.sh prompt_file=prompts.txt compare_uncached=true
#   bash scripts/sample_flux.sh model.path=/data/FLUX.1-dev dtype=bfloat16 cpu_offload=true vae_tiling=true
#   bash scripts/sample_flux.sh model=flux_schnell        # or model=flux_kontext image=input.png
#   NPROC=8 bash scripts/sample_flux.sh prompt_file=drawbench.txt   # data-parallel: one process per GPU
# All keys: configs/sample_flux.yaml. Outputs: runs/flux/<settings>/ (PNGs, config.yaml, run.json, metrics.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec python -m taylorseer.harness.launch --standalone --nproc_per_node "$NPROC" -m taylorseer_flux.sample "$@"
fi
python -m taylorseer_flux.sample "$@"
