#!/usr/bin/env bash
# Reproduce a paper table: sample its sweep (Hydra multirun per block), run its metrics, build the table.
#   bash scripts/sweep.sh digits                                # the bundled digits model on a CPU
#   bash scripts/sweep.sh dit_fid50k hydra/launcher=slurm hydra.launcher.partition=gpu
#   bash scripts/sweep.sh digits --stage table                  # rebuild the table from the run folders
# Experiments: configs/experiment/*.yaml. Outputs: runs/tables/<experiment>/ (run folders, table.md/csv/png).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer_eval.sweep "$@"
