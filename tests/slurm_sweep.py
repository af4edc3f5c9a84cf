"""Submit a Hydra sweep through a launcher and wait for it, every wait bounded: the tests' driver.

    sweep = submit_sweep("tests/slurm_toy_app.py", ["a=1,2", "b=1,2"], cluster, out_root=tmp_path, timeout=300)
    sweep.returncode, sweep.job_ids, sweep.jobs["12_0"]["JobState"], sweep.stderr

``app`` is a module (``taylorseer_dit.sample_ddp``, run with ``python -m``) or a ``.py`` path. The
sweep folder is pinned (``hydra.sweep.dir``) so the job ids and logs can be found while it runs
(``<sweep dir>/.submitit/<job id>/``). :class:`Sweep` is the non-blocking form, for tests that act
on a running sweep (signal it, kill it).

Bounded waits: the whole sweep by ``timeout``; and since submitit cannot learn the state of a job
without accounting (no slurmdbd: ``sacct`` fails), a job that left the queue without writing its
result would make the sweep wait forever. The wait therefore watches the queue: when every job of
the sweep has left it and the sweep still runs ``orphan_grace_s`` later, the sweep is stopped and
the error names the jobs, their states and log tails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class SweepError(AssertionError):
    """The sweep did not finish within its bounds; the message says what the cluster saw."""


@dataclass
class SweepResult:
    returncode: int
    stdout: str
    stderr: str
    sweep_dir: Path
    job_ids: list[str]
    seconds: float
    jobs: dict[str, dict] = field(default_factory=dict)  # job id -> `scontrol show job` fields

    def log(self, job_id: str, task: int = 0, stream: str = "err") -> Path:
        return self.sweep_dir / ".submitit" / job_id / f"{job_id}_{task}_log.{stream}"


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(missing)"


class Sweep:
    """A running ``--multirun`` (its own process group, output in files so no pipe can block it)."""

    def __init__(self, app: str, overrides: list[str], cluster=None, launcher: str = "slurm",
                 out_root: str | Path | None = None, extra_env: dict | None = None):
        self.cluster = cluster
        root = Path(out_root) if out_root is not None else REPO / "runs"
        self.sweep_dir = root / "multirun" / f"sweep-{uuid.uuid4().hex[:8]}"
        self.sweep_dir.mkdir(parents=True)
        cmd = [sys.executable, app] if app.endswith(".py") else [sys.executable, "-m", app]
        cmd += ["--multirun", f"hydra/launcher={launcher}", f"hydra.sweep.dir={self.sweep_dir}"]
        if out_root is not None:
            cmd.append(f"out_root={out_root}")
        self.cmd = cmd + list(overrides)
        env = dict(cluster.env if cluster is not None else os.environ)
        env.update(extra_env or {})
        self._out = open(self.sweep_dir.parent / f"{self.sweep_dir.name}.stdout", "w+")
        self._err = open(self.sweep_dir.parent / f"{self.sweep_dir.name}.stderr", "w+")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    def job_ids(self) -> list[str]:
        """Ids of the jobs submitted so far (array tasks as ``<array>_<index>``), in submission order."""
        folder = self.sweep_dir / ".submitit"
        if not folder.is_dir():
            return []
        ids = [d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*_submitted.pkl"))]

        def order(job_id: str):
            return tuple(int(part) for part in job_id.split("_"))

        return sorted(ids, key=order)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.cluster is not None and (ids := self.job_ids()):
            self.cluster.run("scancel", *ids, check=False)

    def _diagnose(self, why: str) -> SweepError:
        lines = [f"{why}: `{' '.join(self.cmd)}`"]
        for job_id in self.job_ids():
            info = self.cluster.job_info(job_id) if self.cluster is not None else {}
            lines.append(f"job {job_id}: state {info.get('JobState', '?')} exit {info.get('ExitCode', '?')} "
                         f"restarts {info.get('Restarts', '?')}; its stderr:\n"
                         f"{_tail(self.sweep_dir / '.submitit' / job_id / f'{job_id}_0_log.err')}")
        self._err.flush()
        lines.append(f"sweep stderr:\n{_tail(Path(self._err.name))}")
        return SweepError("\n".join(lines))

    def _final_states(self, ids: list[str], until: float) -> dict[str, dict]:
        """``scontrol show job`` of each job once it ended: a job writes its result before its process exits,
        so the sweep may return while the job still shows RUNNING/COMPLETING for a moment."""
        if self.cluster is None:
            return {}
        while True:
            jobs = {job_id: self.cluster.job_info(job_id) for job_id in ids}
            busy = [j for j, info in jobs.items() if info.get("JobState") in ("PENDING", "RUNNING", "COMPLETING",
                                                                              "REQUEUED", "CONFIGURING")]
            if not busy or time.monotonic() > until:
                return jobs
            time.sleep(0.25)

    def wait(self, timeout: float = 300, orphan_grace_s: float = 30) -> SweepResult:
        deadline = self.started + timeout
        left_queue_at = None
        while self.proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                error = self._diagnose(f"sweep still running after {timeout:.0f} s")
                self._stop()
                raise error
            ids = self.job_ids()
            if self.cluster is not None and ids:
                queued = set(self.cluster.queue())
                if any(job_id in queued or job_id.split("_")[0] in queued for job_id in ids):
                    left_queue_at = None
                else:
                    left_queue_at = left_queue_at or now
                    if now - left_queue_at > orphan_grace_s:
                        error = self._diagnose(
                            f"every job left the queue {orphan_grace_s:.0f} s ago but the sweep still waits "
                            f"(a job that ended without its result: submitit cannot see it end without sacct)")
                        self._stop()
                        raise error
            time.sleep(0.5)
        for handle in (self._out, self._err):
            handle.flush()
        ids = self.job_ids()
        jobs = self._final_states(ids, until=time.monotonic() + 30)
        result = SweepResult(self.proc.returncode, Path(self._out.name).read_text(), Path(self._err.name).read_text(),
                             self.sweep_dir, ids, time.monotonic() - self.started, jobs)
        self._out.close()
        self._err.close()
        return result


def submit_sweep(app: str, overrides: list[str], cluster=None, launcher: str = "slurm", timeout: float = 300,
                 out_root: str | Path | None = None, orphan_grace_s: float = 30,
                 extra_env: dict | None = None) -> SweepResult:
    """Run ``app --multirun hydra/launcher=<launcher> <overrides>`` to its end (or raise SweepError)."""
    sweep = Sweep(app, overrides, cluster, launcher, out_root, extra_env)
    return sweep.wait(timeout, orphan_grace_s)
