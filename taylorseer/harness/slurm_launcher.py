"""What the sweep launchers add to Hydra's submitit launchers: a failed job says where it failed.

``configs/hydra/launcher/slurm.yaml`` and ``local.yaml`` are hydra-submitit-launcher's own launchers
(sbatch job arrays, srun tasks, submitit's USR2 checkpoint-and-requeue path) with this Hydra callback
switched on (``configs/hydra/callbacks/sweep_failures.yaml``). It runs inside each job:

* **A failed job surfaces its traceback and its log.** Hydra catches an exception inside the job and
  ships it back without its traceback (tracebacks do not pickle), so the sweep stopped with the
  launching process's stack and no word of where the job ran. Here the job formats its own traceback,
  and the error the sweep raises reads ``job <id> (<overrides>) failed: <error> -- log: <its .err
  file>`` followed by that traceback. The same line goes into the job's log. With K tasks (K
  ranks of one run, :mod:`taylorseer.harness.distributed`) Hydra reads task 0's outcome only,
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

**Each job requests what its run needs.** A run with context parallelism (``parallel.ulysses x
parallel.ring = K``, :mod:`taylorseer.attach.parallel`) takes K ranks per generation, and a GPU run one GPU
per rank. The launcher configs default ``tasks_per_node`` to K and ``gpus_per_node`` to ``tasks_per_node``
(none when ``device=cpu``) through two OmegaConf resolvers registered here (:data:`RESOLVERS`), read from each
run's own config. hydra-submitit-launcher resolves its settings once for the whole sweep and submits one job
array; :class:`PerJobResources` (the launcher ``hydra_plugins.taylorseer_launchers`` registers, since Hydra
finds launchers only under ``hydra_plugins``) resolves them for every job instead, submits one array per
distinct set of resources (a sweep over ``parallel.ulysses=1,2`` is two arrays, of 1 and 2 tasks), and
refuses, before anything is submitted, a job whose ranks are not a multiple of K or whose node has fewer GPUs
than ranks, naming the fix.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
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

    def __init__(self) -> None:
        register_launchers()  # made before the sweep instantiates its launcher

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


def register_launchers() -> None:
    """Hydra finds launchers by listing the ``hydra_plugins`` namespace, which misses a package of a PEP 660 editable
    install (``pip install -e``: importable but not listed, hydra#3252) unless the repository is on the path:
    register ours by class (Hydra's public ``Plugins.register``)."""
    try:  # imported here: that module imports this one
        from hydra_plugins.taylorseer_launchers import launchers
    except ImportError:  # hydra-submitit-launcher is not installed: no launcher to register
        return
    for launcher in (getattr(launchers, "SlurmLauncher", None), getattr(launchers, "LocalLauncher", None)):
        if launcher is not None:
            Plugins.instance().register(launcher)


def _job_place() -> tuple[str, int, int, str, str]:
    """(job id, task rank, task count, stderr log, stdout log) of this submitit job; placeholders outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # e.g. Hydra's basic launcher: this process is the job
        return "(in this process)", 0, 1, "(this process's stderr)", "(this process's stdout)"
    import submitit

    env = submitit.JobEnvironment()
    paths = env.paths
    return env.job_id, env.global_rank, env.num_tasks, str(paths.stderr), str(paths.stdout)


# ---- what a job requests: from its own run's config ---------------------------------------------------------

log = logging.getLogger(__name__)


def parallel_degree(config: DictConfig) -> int:
    """K = ``parallel.ulysses x parallel.ring`` of a run: the ranks one generation takes (1 without the settings)."""
    return int(OmegaConf.select(config, "parallel.ulysses", default=1)) * int(
        OmegaConf.select(config, "parallel.ring", default=1))


def uses_gpus(config: DictConfig) -> bool:
    """A run on GPUs: every ``device`` but ``cpu`` (``auto`` on a cluster means the GPUs the job asks for)."""
    return str(OmegaConf.select(config, "device", default="auto")) != "cpu"


def _tasks_default(*, _root_: DictConfig) -> int:
    return parallel_degree(_root_)


def _gpus_default(tasks_per_node: int, *, _root_: DictConfig) -> int | None:
    return int(tasks_per_node) if uses_gpus(_root_) else None


# ``tasks_per_node: ${taylorseer.parallel_degree:}``, ``gpus_per_node: ${taylorseer.gpus_per_rank:${.tasks_per_node}}``
RESOLVERS = {"taylorseer.parallel_degree": _tasks_default, "taylorseer.gpus_per_rank": _gpus_default}
for _name, _resolver in RESOLVERS.items():
    OmegaConf.register_new_resolver(_name, _resolver, replace=True)


class ResourceError(CompactHydraException, ValueError):
    """A sweep job whose resources cannot host its run; raised before anything is submitted. Hydra prints a
    CompactHydraException's message alone (no traceback of Hydra's internals: the message says it all)."""


@dataclass
class SweepJob:
    """One job of a sweep as the launcher submits it: its overrides, resolved launcher settings and needs."""

    index: int  # Hydra's job number
    overrides: list[str]
    params: dict  # hydra.launcher of this job's config, resolved (without _target_)
    degree: int  # K ranks per generation
    gpu: bool

    def problem(self) -> str | None:
        """Why these resources cannot host the run, or None."""
        nodes, tasks, gpus = self.params.get("nodes", 1), self.params["tasks_per_node"], self.params.get(
            "gpus_per_node")
        where = f"#{self.index} ({_overrides_text(self.overrides) or 'no overrides'})"
        if (nodes * tasks) % self.degree:
            return (f"{where}: one generation takes parallel.ulysses x parallel.ring = {self.degree} ranks, but "
                    f"hydra.launcher.nodes={nodes} x tasks_per_node={tasks} = {nodes * tasks} ranks")
        other_gpu_request = self.params.get("gres") or self.params.get("gpus_per_task")
        if self.gpu and gpus is not None and gpus < tasks and not other_gpu_request:
            return (f"{where}: a GPU run takes one GPU per rank, but hydra.launcher.gpus_per_node={gpus} < "
                    f"tasks_per_node={tasks}")
        return None


def check_jobs(jobs: Sequence[SweepJob]) -> None:
    """Refuse the sweep, before submitting anything, if a job's resources cannot host its run."""
    problems = [p for job in jobs if (p := job.problem())]
    if not problems:
        return
    multiple = math.lcm(*(job.degree for job in jobs))
    shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
    raise ResourceError(
        f"[sweep] error: {len(problems)} of {len(jobs)} jobs cannot run on the resources they would request "
        f"(nothing was submitted):\n  " + "\n  ".join(shown) + "\nFix: leave hydra.launcher.tasks_per_node and "
        f"gpus_per_node at their defaults (each job then requests parallel.ulysses x parallel.ring ranks and one GPU "
        f"per rank), or set tasks_per_node to a multiple of {multiple} (every run of this sweep) and gpus_per_node to "
        f"tasks_per_node (device=cpu for a CPU run)")


class PerJobResources:
    """hydra-submitit-launcher's ``launch``, with every job's resources resolved from its own config.

    Mixed into its ``SlurmLauncher``/``LocalLauncher`` (``hydra_plugins/taylorseer_launchers``): the jobs that
    request the same resources form one job array, as before; a sweep whose jobs differ (``parallel.ulysses=1,2``)
    submits one array per set, all of them before waiting for any. ``__call__`` (the job itself) is unchanged.
    """

    def sweep_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[SweepJob]:
        """Every job with the launcher settings of its own config (composed as the job will compose it; Hydra's
        sweeper already composes each job's config once to validate the batch, this is the second time)."""
        jobs = []
        for offset, overrides in enumerate(job_overrides):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            params = OmegaConf.to_container(config.hydra.launcher, resolve=True)
            params.pop("_target_", None)
            jobs.append(SweepJob(initial_job_idx + offset, list(overrides), params, parallel_degree(config),
                                 uses_gpus(config)))
        return jobs

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))  # resolved first: every job's config copies its cache
        jobs = self.sweep_jobs(job_overrides, initial_job_idx)
        check_jobs(jobs)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        arrays: dict[str, list[SweepJob]] = {}
        for job in jobs:
            arrays.setdefault(json.dumps(job.params, sort_keys=True, default=str), []).append(job)
        submitted = {}
        for members in arrays.values():
            params = members[0].params
            log.info(f"\tjob array of {len(members)}: {params.get('nodes', 1)} node(s) x {params['tasks_per_node']}"
                     f" task(s), gpus_per_node={params.get('gpus_per_node')}")
            for job in members:
                log.info(f"\t#{job.index} : {' '.join(filter_overrides(job.overrides))}")
            args = [(job.overrides, "hydra.sweep.dir", job.index, f"job_id_for_{job.index}", Singleton.get_state())
                    for job in members]
            handles = self._executor(params).map_array(self, *zip(*args, strict=True))
            submitted.update(zip((job.index for job in members), handles, strict=True))
        return [submitted[job.index].results()[0] for job in jobs]

    def _executor(self, params: dict):
        """submitit's executor for one array, set up as hydra-submitit-launcher sets up its single one."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init_keys = {"submitit_folder", "max_num_timeout"}
        init = {f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]} if "max_num_timeout" in params else {}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params["submitit_folder"], **init)
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in common else f"{self._EXECUTOR}_{key}": value
                                      for key, value in params.items() if key not in init_keys})
        return executor
