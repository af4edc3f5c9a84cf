"""Calling a metric that lives in its own environment (``.venv-imagereward``, ``.venv-vbench``).

The core side writes a request, runs ``<env python> eval/runners/run_<name>.py REQUEST RESULT`` (the
runner's own output, progress bars included, goes to this process's stderr) and reads the result (the
protocol is in ``runners/_protocol.py``). A failure the runner understood (package or weights missing)
comes back as one line; a crash prints the runner's traceback and then fails with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from taylorseer.harness.diffusers_io import WeightsNotFoundError

RUNNERS = Path(__file__).resolve().parent / "runners"
REPO = Path(__file__).resolve().parents[1]
PROTOCOL_VERSION = 1


class RunnerFailed(RuntimeError):
    """The metric's runner failed; the message is one line saying why."""


def env_python(name: str, python: str | None = None) -> Path:
    """The interpreter of environment ``name``: ``python`` if given, else ``$TAYLORSEER_<NAME>_PYTHON``, else
    ``<EVAL_ENV_ROOT or the repo>/.venv-<name>/bin/python`` (what ``scripts/setup_eval_envs.sh`` builds)."""
    chosen = python or os.environ.get(f"TAYLORSEER_{name.upper()}_PYTHON")
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--python {path} does not exist: pass the python of an environment with the "
                                    f"{name} package, or build one with `bash scripts/setup_eval_envs.sh {name}`")
        return path
    path = Path(os.environ.get("EVAL_ENV_ROOT", REPO)) / f".venv-{name}" / "bin" / "python"
    if not path.is_file():
        raise FileNotFoundError(f"the {name} environment is not built ({path} is missing): run "
                                f"`bash scripts/setup_eval_envs.sh {name}` (about a minute, reuses the core torch)")
    return path


def _stream():
    """Where the runner's output goes: our stderr when it is a real file, else captured and re-printed."""
    try:
        sys.stderr.fileno()
        return sys.stderr, False
    except (AttributeError, OSError, ValueError):
        return subprocess.PIPE, True


def call_runner(name: str, request: dict, python: str | None = None, env: dict | None = None,
                timeout: float | None = None) -> dict:
    """Send ``request`` to the runner of metric ``name`` and return its result (``ok`` is true)."""
    interpreter = env_python(name, python)
    script = RUNNERS / f"run_{name}.py"
    with tempfile.TemporaryDirectory(prefix=f"taylorseer-{name}-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"protocol": PROTOCOL_VERSION, **request}))
        out, capture = _stream()
        proc = subprocess.run([str(interpreter), str(script), str(req), str(res)], stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=timeout,
                              text=True)
        if capture and proc.stdout:
            print(proc.stdout, file=sys.stderr, end="")
        if not res.is_file():
            tail = (proc.stdout or "").strip().splitlines()[-1:] if capture else []
            raise RunnerFailed(f"the {name} runner ({interpreter}) exited with status {proc.returncode} without a "
                               f"result{': ' + tail[0] if tail else ' (its output is above)'}")
        result = json.loads(res.read_text())
    if result.get("ok"):
        return result
    if result.get("traceback"):
        print(result["traceback"], file=sys.stderr)
    message = f"{name}: {result.get('error', 'unknown error')}"
    if result.get("kind") == "weights_missing":
        raise WeightsNotFoundError(message)
    if result.get("kind") == "crash":
        message += f" (a crash inside {interpreter}; traceback above)"
    raise RunnerFailed(message)
