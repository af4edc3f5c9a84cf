"""torchrun, with a failed rank reported in one line instead of torch's ChildFailedError traceback.

    python -m taylorseer.harness.launch --nproc_per_node 8 -m taylorseer_dit.sample_ddp num_samples=50000
    python -m taylorseer.harness.launch --nnodes 2 --rdzv-backend c10d --rdzv-endpoint host:29500 -m ...  # torchrun's

Everything runs through ``torch.distributed.run``'s own parser and elastic agent (no process spawning
here). Only two defaults differ from plain torchrun, and an explicit option wins over each:

* every rank's stdout and stderr are teed into ``--log-dir`` (default: a fresh temporary folder,
  ``<log-dir>/<run id>/attempt_<k>/<local rank>/stderr.log``) and the console shows local rank 0
  (``--tee 3 --local-ranks-filter 0``), so K ranks failing alike print their error once;
* a failed child ends the launch with one line on stderr, ``[launch] rank R failed: <its message> --
  log: <its stderr.log> (rank 0 exit code 2, rank 1 killed by SIGTERM)``, and the launcher exits with
  the status of the first rank that exited with an error (128 + N for a child killed by signal N).

The message is the child's own one-line error (``[app] error: ...``), else the last line of its
Python traceback, else a native crash's own line (``terminate called ...``, ``Fatal Python error: ...``), else the
message torch recorded through ``@record``. Children run with ``PYTHONFAULTHANDLER=1`` unless it is set, so a rank
that dies in native code (an abort in a communication library) leaves its Python stack in its log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

TAG = "[launch]"
_NOISY_LOGGERS = {  # torch's own reports of what this module reports in one line
    "torch.distributed.run": logging.ERROR,  # the OMP_NUM_THREADS banner (torchrun sets it to 1 unless set)
    "torch.distributed.elastic.multiprocessing.api": logging.CRITICAL,  # "failed (exitcode: 2) local_rank: ..."
    "torch.distributed.elastic.agent.server.api": logging.ERROR,
    "torch.distributed.launcher.api": logging.ERROR,
}
_APP_ERROR = re.compile(r"^\[[\w.-]+\] error: ")  # the apps' one-line settings errors (runs.clear_errors)
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")
# a rank that died in native code: the C++ runtime's or CPython's own last words, the cause before the symptom
_NATIVE_CAUSE = re.compile(r"^(terminate called .*|.*Segmentation fault.*|.*Assertion .* failed.*)")
_FATAL = re.compile(r"^Fatal Python error: .*")
# signals a rank gets from its own faults; SIGTERM/SIGKILL/SIGINT are how the agent (or a user) stops the others
_OWN_SIGNALS = {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
_PREFIX = re.compile(r"^\[(rank|default)\d+\]:\s?")  # torch's per-rank prefixes
# errors a rank gets because a peer died first (gloo/NCCL/store): reported after the peer's own error
_PEER_DIED = re.compile(r"by peer|broken pipe|monitoredBarrier|remote (worker|process|peer)"
                        r"|ranks? \d+ .*(closed|timed out)|waiting for clients|the other ranks", re.IGNORECASE)


def _stderr_log(log_dir: Path, local_rank: int) -> Path | None:
    """The newest ``stderr.log`` torch wrote for ``local_rank`` under ``log_dir``."""
    logs = list(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


def _message_from_log(path: Path | None) -> tuple[str, bool]:
    """(the line that says why the rank failed, whether it is an error): else its last line, which may be only a
    warning it printed before it was stopped, and is no error."""
    if path is None:
        return "", False
    try:
        lines = [_PREFIX.sub("", line).strip() for line in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "", False
    lines = [line for line in lines if line]
    for pattern in (_APP_ERROR, _EXCEPTION, _NATIVE_CAUSE, _FATAL):
        found = [line for line in lines if pattern.match(line)]
        if found:
            return found[-1], True
    return (lines[-1] if lines else ""), False


def _message_from_record(failure) -> str:
    """What ``@record`` wrote into the error file (a string or {"message": ...})."""
    if failure.error_file_data in (None, {}) or not failure.error_file or failure.error_file == "<N/A>":
        return ""  # torch made the message up (a signal, "to enable traceback see ..."): not the child's words
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "")
    if "pytorch.org/docs/stable/elastic/errors.html" in message:  # torch's placeholder when nothing was recorded
        return ""
    if message.lstrip().startswith("{"):
        try:
            message = json.loads(message).get("message", message)
        except (ValueError, AttributeError):
            pass
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _died_by_itself(exitcode: int) -> bool:
    """An error exit, or a signal of the rank's own fault (an abort, a segfault), not the agent's stop."""
    return exitcode > 0 or (exitcode < 0 and -exitcode in _OWN_SIGNALS)


def describe_failure(failures: dict, log_dir: Path | None) -> tuple[str, int]:
    """One line for a launch whose children failed, and the exit status to keep.

    ``failures`` maps global rank -> torch's ``ProcessFailure``. The rank reported is the one that said
    why: a rank that printed an error of its own comes before one whose error says a peer went away
    (connection closed by peer, a missed barrier) and before one that printed no error (nothing, or only
    warnings: the apps print settings errors on rank 0 only); then one that died by itself (an error
    exit, or SIGABRT/SIGSEGV from its own fault) before one the agent stopped by SIGTERM/SIGKILL
    afterwards; then the earliest last write of its log; then the lowest rank. The exit status is that
    of the first rank that died by itself.
    """
    rows = []
    for rank, failure in failures.items():
        log = _stderr_log(log_dir, failure.local_rank) if log_dir is not None else None
        message, said_why = _message_from_log(log)
        if not said_why:
            recorded = _message_from_record(failure)
            message, said_why = (recorded, True) if recorded else (message, False)
        when = log.stat().st_mtime if log is not None else float(failure.timestamp)
        key = (not said_why, bool(_PEER_DIED.search(message)), not _died_by_itself(failure.exitcode), when, rank)
        rows.append({"rank": rank, "failure": failure, "message": message, "log": log, "key": key})
    rows.sort(key=lambda row: row["key"])
    first = rows[0]
    status = next((row["failure"].exitcode for row in rows if _died_by_itself(row["failure"].exitcode)),
                  first["failure"].exitcode)

    def what(failure) -> str:
        return f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"killed by {failure.signal_name()}"

    line = f"{TAG} rank {first['rank']} failed: {first['message'] or 'it printed no error'}"
    line += f" -- log: {first['log']}" if first["log"] else " -- no log file (pass --tee 3 to keep one)"
    # a rank that failed is often stopped by the agent before it exits by itself: every status, in rank order
    line += " (" + ", ".join(f"rank {row['rank']} {what(row['failure'])}"
                             for row in sorted(rows, key=lambda row: row["rank"])) + ")"
    return line, _exit_status(status)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.tee == "0" and args.redirects == "0":  # the user chose no output handling: ours
        args.tee = "3"
        if not args.local_ranks_filter:
            args.local_ranks_filter = "0"
    if args.log_dir is None:
        args.log_dir = tempfile.mkdtemp(prefix="taylorseer-launch-")
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # the children inherit it: a native crash shows its stack
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:
        torchrun.run(args)
    except ValueError as err:  # torchrun's own check of its options (e.g. --nproc_per_node two), before any child
        print(f"[launch] error: an option is invalid: {err} (--nproc_per_node N or auto/cpu/gpu/xpu, --nnodes N or "
              f"MIN:MAX; torchrun --help lists the rest)", file=sys.stderr, flush=True)
        return 2
    except ChildFailedError as err:
        line, status = describe_failure(err.failures, Path(args.log_dir))
        print(line, file=sys.stderr, flush=True)
        return status
    except SignalException as err:  # scancel, a preemption, Ctrl-C: torchrun has already stopped every rank
        name = signal.Signals(err.sigval).name
        print(f"[launch] stopped by {name}: every rank was stopped (the apps keep what they finished: rerun the same "
              f"command to resume) -- logs: {args.log_dir}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
