#!/usr/bin/env bash
# HunyuanVideo text-to-video with TaylorSeer (diffusers' HunyuanVideoPipeline, unmodified). Overrides go to Hydra:
#   bash scripts/sample_hunyuan_video.sh 'prompt="a cat walks on the grass, realistic style"' videos_per_prompt=1
#   bash scripts/sample_hunyuan_video.sh prompt_file=prompts.txt                # VBench: 5 videos per prompt
#   bash scripts/sample_hunyuan_video.sh model.path=/data/HunyuanVideo cpu_offload=true cache.offload=true
#   bash scripts/sample_hunyuan_video.sh cache=none                            # the uncached baseline
# All keys: configs/sample_hunyuan_video.yaml. Outputs: runs/hunyuan_video/<settings>/ ({prompt}-{index}.mp4,
# config.yaml, metrics.json).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_hunyuan_video.sample "$@"
