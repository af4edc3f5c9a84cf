"""What the sweep launchers add to Hydra's submitit launchers: a failed job says where it failed.

``configs/hydra/launcher/slurm.yaml`` and ``local.yaml`` are hydra-submitit-launcher's own launchers
(sbatch job arrays, srun tasks, submitit's USR2 checkpoint-and-requeue path) with this Hydra callback
switched on (``configs/hydra/callbacks/sweep_failures.yaml``). It runs inside each job:

* **A failed job surfaces its traceback and its log.** Hydra catches an exception inside the job and
  ships it back without its traceback (tracebacks do not pickle), so the sweep stopped with the
  launching process's stack and no word of where the job ran. Here the job formats its own traceback,
  and the error the sweep raises reads ``job <id> (<overrides>) failed: <error> -- log: <its .err
  file>`` followed by that traceback. The same line goes into the job's log. With K tasks (K
  data-parallel ranks of one run, :mod:`taylorseer.harness.distributed`) Hydra reads task 0's outcome only,
  and a rank that failed first makes the others fail in their next collective, so the line also names
  the pattern of every task's log.
* **A failed job leaves a record**, ``job_failed.json`` in its Hydra job folder
  (``<sweep dir>/<job num>/``): overrides, job id, error, traceback, log paths, so whatever reads the
  sweep afterwards can mark that run failed instead of missing it. Hydra stops at the first failed job
  it reads back; the other jobs still run to their end and leave their own records.

* **A failed job ends FAILED.** Hydra catches the job's exception and submitit pickles it back, so the
  job's process would exit 0 and Slurm would call it COMPLETED. Inside a submitit job, the process of a
  failed job exits with status 1 once everything else is done (the result is already written), so
  ``sacct`` says FAILED. Hydra's basic launcher runs the jobs in the sweep's own process: nothing is
  changed there.

Hydra writes nothing per
task as long as ``hydra.output_subdir`` is null and job logging goes to the console, as
``configs/base.yaml`` sets for every app; the app's shared files are written by rank 0.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import runs

FAILURE_RECORD = "job_failed.json"  # in the Hydra job folder <sweep dir>/<job num>/


class JobFailedError(RuntimeError):
    """A sweep job raised; the message carries its traceback and log path (tracebacks do not pickle)."""


def _overrides_text(overrides) -> str:
    return " ".join(str(o) for o in (overrides or []) if not str(o).startswith("hydra."))


_FAILED: dict = {}


def _exit_failed() -> None:
    """Registered before the app's own exit handlers, so it runs after them: the exit status of a failed job."""
    if _FAILED.get("failed"):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)


class SweepFailures(Callback):
    """A Hydra callback (``hydra.callbacks``) that the launcher configs switch on; runs inside each job."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") and not _FAILED.get("armed"):  # a job process of its own
            atexit.register(_exit_failed)
            _FAILED["armed"] = True

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        _FAILED["failed"] = True
        error = job_return._return_value
        trace = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
        job_id, rank, tasks, log, out = _job_place()
        where = f"job {job_id}" + (f" task {rank} of {tasks}" if tasks > 1 else "")
        summary = f"{where} ({_overrides_text(job_return.overrides)}) failed: {type(error).__name__}: {error}"
        logs = f"log: {log}"
        if tasks > 1:  # the root cause may be another rank's: every task has its own log
            logs += f" (task t: {log.replace(f'_{rank}_log.', '_<t>_log.')})"
        print(f"[sweep] {summary} -- {logs}", file=sys.stderr, flush=True)
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        if rank == 0 and output_dir:
            runs.write_json(Path(output_dir) / FAILURE_RECORD, {
                "overrides": list(job_return.overrides or []), "job_id": job_id, "error": str(error),
                "error_type": type(error).__name__, "traceback": trace, "stderr": log, "stdout": out})
        # Hydra ships this back to the sweep, which raises it: the traceback must travel as text
        job_return._return_value = JobFailedError(f"{summary} -- {logs}\n--- the job's traceback ---\n{trace}")


def _job_place() -> tuple[str, int, int, str, str]:
    """(job id, task rank, task count, stderr log, stdout log) of this submitit job; placeholders outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # e.g. Hydra's basic launcher: this process is the job
        return "(in this process)", 0, 1, "(this process's stderr)", "(this process's stdout)"
    import submitit

    env = submitit.JobEnvironment()
    paths = env.paths
    return env.job_id, env.global_rank, env.num_tasks, str(paths.stderr), str(paths.stdout)
