#!/usr/bin/env bash
# Metrics over finished run folders; results go into each run's metrics.json["eval"] and print as a table.
#   bash scripts/eval.sh fid runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz
#   bash scripts/eval.sh inception runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz    # IS, KID, P/R
#   bash scripts/eval.sh clip runs/flux/<run>                 bash scripts/eval.sh imagereward runs/flux/<run>
#   bash scripts/eval.sh fidelity runs/flux/<cached> --reference runs/flux/<uncached>         # PSNR, SSIM, LPIPS
#   bash scripts/eval.sh vbench runs/hunyuan_video/<run>
#   bash scripts/eval.sh prompts vbench -o vbench_prompts.txt
# `bash scripts/eval.sh <metric> --help` lists the options. imagereward and vbench run in their own
# environments: build them once with `bash scripts/setup_eval_envs.sh imagereward|vbench`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_eval.cli "$@"
