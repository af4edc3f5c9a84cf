#!/usr/bin/env bash
# The project's test command, in two tiers (sets up .venv first if needed):
#
#   bash scripts/test.sh          the fast tier (-m 'not gpu and not slow'): every module of taylorseer/ and every
#                                 app -- forecast exactness, schedules, settings errors, one short sampling per app;
#                                 a few minutes on 2 cores
#   bash scripts/test.sh --all    the full tier (-m 'not gpu'): the fast tier plus the tests marked slow -- real
#                                 Slurm (when installed and root: see .ci/run), the sweeps, every README command,
#                                 multi-process runs killed and resumed, training, the digits quality checks.
#                                 What CI runs (.ci/run).
#
# Which test is in which tier: FULL_TIER in tests/conftest.py (tests/test_tiers.py checks that the fast tier still
# imports every module). Both tiers run on TEST_WORKERS processes (default 2; pytest-xdist), grouped so that the
# tests that start process groups or a Slurm cluster run one at a time (--dist loadgroup, SERIAL in the conftest);
# TEST_WORKERS=0 runs in this process. Extra arguments go to pytest after ours (a later -m or -n wins), e.g.
#   bash scripts/test.sh -k schedule          bash scripts/test.sh --all tests/test_slurm.py
#   bash scripts/test.sh -m slow              (the full tier's own tests only)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

tier=()
if [ "${1:-}" = "--all" ]; then
  shift
  tier=(-m "not gpu")  # replaces the default selection of pyproject.toml's addopts
fi
workers="${TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != "0" ]; then
  if python -c "import xdist" 2>/dev/null; then
    parallel=(-n "$workers" --dist loadgroup)
  else
    echo "[test] pytest-xdist is not installed (pip install -e '.[dev]'): running on one core" >&2
  fi
fi
python -m pytest -q ${parallel[@]+"${parallel[@]}"} ${tier[@]+"${tier[@]}"} "$@"
