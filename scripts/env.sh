# Sourced by the other scripts: creates or updates the project's virtual environment (.venv) and
# activates it. Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TAYLORSEER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[env] installing the project and its dependencies (first run: a few minutes)" >&2
  python -m pip install -q --upgrade pip >&2
  # torch first, pinned to the pair that works with torchvision here; a range elsewhere.
  python -m pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1" >&2
  python -m pip install -q -e "$ROOT[dev,eval,slurm]" >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
