"""A real one-node Slurm cluster on localhost for the tests (Debian's slurmctld, slurmd and munge).

Each cluster is private to the test session that starts it: its own munged (own key and socket),
its own slurm.conf, state and spool folders under one temporary folder, and free TCP ports, so two
test sessions on one machine (or a system Slurm) never see each other's jobs. Clients (sbatch,
srun, squeue, scancel, submitit through Hydra) reach it through ``SLURM_CONF``, which the jobs
inherit.

Every wait is bounded: a cluster that does not come up fails with the tail of its logs instead
of hanging. Starting needs root (slurmd runs jobs as their submitter; munged runs as ``munge``).
Facts behind the choices (Slurm 22.05, Debian 12): ``../shared/notes/slurm-local.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("slurmctld", "slurmd", "srun", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "munged", "mungekey",
            "munge", "unmunge", "runuser")
APT_LINE = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
ENABLE_HINT = (f"the Slurm tests start a private one-node cluster on localhost: as root run `{APT_LINE}` "
               f"(Debian/Ubuntu), then rerun the tests as root")
REQUIRE_ENV = "TAYLORSEER_REQUIRE_SLURM"  # set by .ci/run: a cluster that cannot start fails instead of skipping
PLACEHOLDER_GPUS = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random")  # device files standing in for GPUs


def _search_path() -> str:
    return f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"  # daemons live in sbin, often not on a user's PATH


def _which(program: str) -> str:
    return shutil.which(program, path=_search_path()) or program


def missing_programs(path: str | None = None) -> list[str]:
    """The programs of PROGRAMS not found on ``path`` (default: PATH plus the sbin folders)."""
    path = path if path is not None else _search_path()
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def why_unavailable(path: str | None = None) -> str | None:
    """None when a local cluster can be started here, else the reason (with how to enable it)."""
    missing = missing_programs(path)
    if missing:
        return f"Slurm programs not installed ({', '.join(missing)}): {ENABLE_HINT}"
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}): {ENABLE_HINT}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (PID 1 here does not reap daemons)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no file)"


class ClusterError(RuntimeError):
    """The local cluster did not start or stop within its time; the message holds the daemons' logs."""


@dataclass
class SlurmCluster:
    """A private single-node cluster. ``start()`` / ``stop()``; ``env`` reaches it.

    ``root`` defaults to a fresh folder under the system temp dir: every folder above it must be
    traversable by the ``munge`` and ``slurm`` users (pytest's own temporary folders are 0700).

    The node has ``gpus`` GPU slots so that a job's GPU request (``--gpus-per-node``) is scheduled and checked
    as on a GPU cluster: each is a character device that is not a GPU (``/dev/null``, ...; Slurm counts a GPU
    per device file, and reports 0 for a count without files), so a job's code still runs on the CPU.
    """

    root: Path | None = None
    partition: str = "debug"
    gpus: int = 2  # GPU slots Slurm schedules (--gpus-per-node), at most 4: no GPU behind them
    timings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="taylorseer-slurm-"))
        self.root = Path(self.root)
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.ctld_dir = self.root / "slurmctld"
        self.socket = self.munge_dir / "munge.socket"
        self.started = False

    # ---- environment and commands -------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        """``os.environ`` plus what points clients (and the jobs they submit) at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster, bounded by ``timeout``."""
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job_info(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdErr, ...); {} once purged."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        info = {}
        for token in result.stdout.split():
            key, _, value = token.partition("=")
            info.setdefault(key, value)
        return info

    def queue(self) -> list[str]:
        """Ids of the jobs still pending, running or completing."""
        out = self.run("squeue", "-h", "-o", "%i").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def completions(self) -> list[dict]:
        """The job completion records (jobcomp/filetxt): one per job end, requeues included."""
        path = self.ctld_dir / "jobcomp.txt"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            records.append(dict(token.partition("=")[::2] for token in line.split() if "=" in token))
        return records

    def logs(self) -> str:
        parts = [f"--- {name} (last lines) ---\n{_tail(self.root / name)}"
                 for name in ("slurmctld/slurmctld.log", "slurmd.log", "munge/munged.log")]
        return "\n".join(parts)

    # ---- start ---------------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        probe = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
        facts = dict(t.partition("=")[::2] for t in probe.split() if "=" in t)
        cpus = int(facts["CPUs"])
        memory = int(int(facts["RealMemory"]) * 0.9)  # more than slurmd detects puts the node in state inval
        ctld_port, slurmd_port = _free_port(), _free_port()
        slots = PLACEHOLDER_GPUS[:self.gpus]
        r, ctld = self.root, self.ctld_dir  # slurmctld runs as slurm: its files live in a folder slurm owns
        for sub in (ctld / "state", r / "spool"):
            sub.mkdir(parents=True, exist_ok=True)
        for path in (ctld, ctld / "state"):
            shutil.chown(path, "slurm", "slurm")
        lines = [
            f"ClusterName=ts{os.getpid()}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also delays the restart of a requeued job (default 120 s)
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "SlurmUser=slurm",
            "SlurmdUser=root",
            f"StateSaveLocation={ctld / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={ctld / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={ctld / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "EnforcePartLimits=ALL",  # else a job asking more than the node has pends forever
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={ctld / 'jobcomp.txt'}",
            "KillWait=5",
            # a requeued job becomes eligible after cred_expire; the schedulers then start it within a
            # second instead of at their default 30/60 s rounds
            "SchedulerParameters=bf_interval=1,sched_interval=1",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job` for the tests' checks
            "GresTypes=gpu",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{len(slots)} "
            f"State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)
        gres = self.root / "gres.conf"  # slurmd reads it beside slurm.conf
        gres.write_text("".join(f"NodeName=localhost Name=gpu File={device}\n" for device in slots))
        gres.chmod(0o644)

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)  # the socket's folder: readable by slurm and the jobs, writable by munge only
        key = self.munge_dir / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        subprocess.run(
            [_which("runuser"), "-u", "munge", "--", _which("munged"), f"--socket={self.socket}", f"--key-file={key}",
             f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            check=True, timeout=30, capture_output=True)
        cred = subprocess.run(["munge", "-n", f"--socket={self.socket}"], capture_output=True, timeout=10, check=True)
        subprocess.run(["unmunge", f"--socket={self.socket}"], input=cred.stdout, capture_output=True, timeout=10,
                       check=True)

    def start(self, timeout: float = 90) -> SlurmCluster:
        """Start munged, slurmctld and slurmd; return once ``srun true`` ran and its job left the queue (or raise
        ClusterError)."""
        if self.root.exists() and any(self.root.iterdir()):
            raise ClusterError(f"{self.root} is not empty: a cluster starts from a fresh folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munge and slurm must reach their files below it
        t0 = time.monotonic()
        self.started = True  # from here on, stop() cleans up whatever did start
        try:
            self._write_conf()
            self._start_munge()
            self.run(_which("slurmctld"), "-f", str(self.conf), timeout=30)  # both daemonize
            self.run(_which("slurmd"), "-f", str(self.conf), "-N", "localhost", timeout=30)
            deadline = t0 + timeout
            state = ""
            while time.monotonic() < deadline:
                state = self.run("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False, timeout=10).stdout.strip()
                if state == "idle":
                    break
                time.sleep(0.25)
            else:
                raise ClusterError(f"node not idle after {timeout:.0f} s (state {state!r})")
            self.timings["idle_s"] = time.monotonic() - t0
            # a node can look idle before slurmd registered: only a job proves the cluster works
            left = max(deadline - time.monotonic(), 10)
            self.run("srun", "-N1", "-n1", "-t", "1", "true", timeout=left)
            # srun returns while its job may still be completing (on loaded cores for seconds): a started
            # cluster has an empty queue, so that the tests' queue() sees their own jobs only
            settle = time.monotonic() + 30
            while self.queue() and time.monotonic() < settle:
                time.sleep(0.1)
            if self.queue():
                raise ClusterError(f"the probe job is still in the queue: {self.queue()}")
            self.timings["start_s"] = time.monotonic() - t0
        except (ClusterError, subprocess.SubprocessError, OSError) as err:
            if isinstance(err, subprocess.CalledProcessError):
                err = f"{err} {(err.stderr or b'').decode(errors='replace').strip()}"
            logs = self.logs()
            self.stop()
            raise ClusterError(f"local Slurm did not start: {err}\n{logs}") from err
        return self

    # ---- stop ----------------------------------------------------------------------------------------------
    def _pids(self) -> dict[str, int]:
        files = {"slurmctld": self.ctld_dir / "slurmctld.pid", "slurmd": self.root / "slurmd.pid",
                 "munged": self.munge_dir / "munged.pid"}
        return {name: pid for name, path in files.items() if (pid := _read_pid(path)) is not None}

    @staticmethod
    def _wait_dead(pids: list[int], timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(_alive(p) for p in pids):
                return []
            time.sleep(0.1)
        return [p for p in pids if _alive(p)]

    def stop(self, timeout: float = 30, remove: bool = False) -> None:
        """Cancel every job, ``scontrol shutdown``, then munged by its pid; SIGKILL what outlives ``timeout``.

        ``remove`` deletes the cluster's folder (config, state, logs) once every daemon is gone."""
        if not self.started:
            return
        t0 = time.monotonic()
        pids = self._pids()
        slurm_pids = [pid for name, pid in pids.items() if name != "munged"]
        if any(_alive(p) for p in slurm_pids):
            try:  # running jobs would outlive slurmd (their slurmstepd keeps going)
                self.run("scancel", "--full", "--quiet", "--user", "root", check=False, timeout=10)
                deadline = time.monotonic() + timeout / 2
                while self.queue() and time.monotonic() < deadline:
                    time.sleep(0.25)
                self.run("scontrol", "shutdown", check=False, timeout=10)
            except (subprocess.SubprocessError, ClusterError):
                pass
        stuck = self._wait_dead(slurm_pids, timeout / 2)
        for pid in stuck:
            os.kill(pid, signal.SIGKILL)
        if "munged" in pids and _alive(pids["munged"]):
            os.kill(pids["munged"], signal.SIGTERM)
            for pid in self._wait_dead([pids["munged"]], 10):
                os.kill(pid, signal.SIGKILL)
        self.timings["stop_s"] = time.monotonic() - t0
        self.timings["killed"] = len(stuck)
        self.started = False
        if remove and not any(_alive(p) for p in pids.values()):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        return json.dumps({"conf": str(self.conf), **{k: round(v, 2) if isinstance(v, float) else v
                                                      for k, v in self.timings.items()}})
