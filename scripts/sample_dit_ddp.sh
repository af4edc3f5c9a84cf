#!/usr/bin/env bash
# FID sampling for DiT on every GPU of the node (torchrun's machinery via taylorseer.harness.launch), resumable;
# packs samples_<N>.npz. A setup error is one line, whatever the number of processes.
#   bash scripts/sample_dit_ddp.sh num_samples=50000 cache.interval=4 cache.max_order=4
# NPROC (default: number of GPUs, else 1) sets the process count. Under Slurm, start the app itself with
# srun (one task per GPU): srun python -m taylorseer_dit.sample_ddp ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
nproc="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
python -m taylorseer.harness.launch --standalone --nproc_per_node "$nproc" -m taylorseer_dit.sample_ddp "$@"
