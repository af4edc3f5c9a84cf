#!/usr/bin/env bash
# What to cache in a diffusers transformer: its blocks' children as patterns, the residual branches (gated or not),
# a block description and what a forecast step still costs (meta device, no weights).
#   bash scripts/discover.sh WanTransformer3DModel | /path/to/pipeline_or_transformer_folder | module:Class [--json]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m taylorseer.attach.discover "$@"
