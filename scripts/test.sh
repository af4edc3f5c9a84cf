#!/usr/bin/env bash
# The project's test command: sets up .venv if needed, then runs the CPU test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k schedule` or `-m slow`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
python -m pytest -q "$@"
