#!/usr/bin/env bash
# HunyuanVideo text-to-video with TaylorSeer (diffusers' HunyuanVideoPipeline, unmodified). Overrides go to Hydra:
#   bash scripts/sample_hunyuan_video.sh 'prompt="a cat walks on the grass, realistic style"' videos_per_prompt=1
#   bash scripts/sample_hunyuan_video.sh prompt_file=prompts.txt                # VBench: 5 videos per prompt
#   bash scripts/sample_hunyuan_video.sh model.path=/data/HunyuanVideo cpu_offload=true cache.offload=true
#   bash scripts/sample_hunyuan_video.sh cache=none                            # the uncached baseline
#   NPROC=8 bash scripts/sample_hunyuan_video.sh prompt_file=vbench_prompts.txt  # data-parallel: one process per GPU
# All keys: configs/sample_hunyuan_video.yaml. Outputs: runs/hunyuan_video/<settings>/ ({prompt}-{index}.mp4,
# config.yaml, run.json, prompts.json, metrics.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec python -m taylorseer.harness.launch --standalone --nproc_per_node "$NPROC" -m taylorseer_hunyuan_video.sample "$@"
fi
python -m taylorseer_hunyuan_video.sample "$@"
