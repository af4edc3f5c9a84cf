"""The JSON protocol between a metric command (core environment) and a runner in a metric's own environment.

Standard library only: this file runs under the interpreters of ``.venv-imagereward`` / ``.venv-vbench``,
where the project itself is not installed. A runner is called as

    <env>/bin/python eval/runners/run_<metric>.py REQUEST.json RESULT.json
    <env>/bin/python eval/runners/run_<metric>.py --check          # imports the package, prints its version

It reads the request, writes ``{"ok": true, ...}`` or ``{"ok": false, "error": "<one line>", "kind": ...}``
to RESULT.json (atomically) and exits 0; anything written to stdout/stderr (the packages print a lot) is
only for the user's terminal. A crash that is not a known failure still writes ``ok: false`` with the
traceback and exits 1, so the caller always has a result file to read.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable

PROTOCOL_VERSION = 1


class RunnerError(Exception):
    """A failure whose message already says what is missing and how to fix it (printed as one line)."""

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind  # "package_missing", "weights_missing", "bad_request", "error"


def write_result(path: str, result: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".result.", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def main(run: Callable[[dict], dict], check: Callable[[], dict], argv: list[str] | None = None) -> int:
    """``run(request) -> result`` answers a request; ``check() -> info`` imports the package (``--check``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--check"]:
        try:
            print(json.dumps({"ok": True, "protocol": PROTOCOL_VERSION, "python": sys.executable, **check()}))
            return 0
        except RunnerError as err:
            print(json.dumps({"ok": False, "error": str(err), "kind": err.kind}))
            return 1
    if len(argv) != 2:
        print("usage: runner.py REQUEST.json RESULT.json | --check", file=sys.stderr)
        return 2
    request_path, result_path = argv
    try:
        with open(request_path) as handle:
            request = json.load(handle)
        if request.get("protocol") != PROTOCOL_VERSION:
            raise RunnerError(f"request protocol {request.get('protocol')!r} != runner protocol {PROTOCOL_VERSION}: "
                              f"the runner and the metric command come from different checkouts", "bad_request")
        result = {"ok": True, "protocol": PROTOCOL_VERSION, "python": sys.executable, **run(request)}
        code = 0
    except RunnerError as err:
        result, code = {"ok": False, "error": str(err), "kind": err.kind}, 0
    except Exception as err:  # noqa: BLE001 - everything else is reported with its traceback, never lost
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result = {"ok": False, "error": f"{type(err).__name__}: {first}", "kind": "crash",
                  "traceback": traceback.format_exc()}
        code = 1
    write_result(result_path, result)
    return code


def import_or_fail(module: str, package: str, env: str):
    """Import ``module`` or raise the one-line error that says how to build the environment."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken pin raising at import time
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RunnerError(
            f"the {package} package cannot be imported by {sys.executable} ({type(err).__name__}: {first}); "
            f"build its environment with `bash scripts/setup_eval_envs.sh {env}`", "package_missing") from err


def resolve_device(name: str) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunnerError(f"device={name!r} but no CUDA device is visible: pass --device cpu or run on a GPU node",
                          "bad_request")
    return name
