"""Data-parallel plumbing every entry point shares: who am I (rank, world, device), and how ranks meet.

One entry point runs unchanged in four places; :func:`detect` reads which one from the environment:

=================  ============================================================================================
``torchrun``       ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``PORT``
                   (torchrun or any launcher that sets torch's env:// variables; they win over the rest)
``slurm``          a task of an ``srun`` step with K tasks (submitit's Slurm jobs are such steps):
                   ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
                   ``SLURM_STEP_TASKS_PER_NODE``; the master is the first host of ``SLURM_STEP_NODELIST``
``submitit-local`` submitit's local executor with K tasks (``SUBMITIT_LOCAL_*``), master 127.0.0.1
``single``         anything else: a world of one, no process group
=================  ============================================================================================

A Slurm *batch* script is not a step: there ``SLURM_NTASKS`` counts the allocation's tasks but only
one process runs, so it is a world of one (with a warning that says to start the program with srun).
The rendezvous port is ``MASTER_PORT`` when set, else derived from the job and step ids, so every task
of a step agrees on it without talking.

:func:`init` forms the process group (gloo on the CPU; nccl on GPUs, one GPU per local rank, plus a
gloo group for the small CPU-side messages: barrier and gathering results). Every wait has a timeout
and fails with a message that names the missing ranks instead of hanging. :func:`shard` splits work
so that every item belongs to exactly one rank.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 600.0  # process-group formation and collectives; a barrier may pass its own
# The end-of-run barrier: peers may still be sampling their last share (a dead peer fails it at once).
WAIT_FOR_PEERS_S = 48 * 3600.0
_PORT_RANGE = (20000, 60000)


class DistributedSetupError(RuntimeError):
    """The ranks could not meet (missing ranks, bad environment); the message says what to check."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands, as read from the environment (see the module docstring)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    source: str = "single"  # torchrun | slurm | submitit-local | single
    note: str = ""  # why a world of one was chosen although the environment hinted at more

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether this process joins a process group: several ranks, or any process torchrun started
        (``--nproc_per_node 1`` too, so code written for a group runs the same with one rank)."""
        return self.world_size > 1 or self.source == "torchrun"


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError as err:
        raise DistributedSetupError(f"{key}={environ[key]!r} is not an integer") from err


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``, ``a[1-2]-ib[4-5]`` -> ``a1-ib4``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistributedSetupError("empty Slurm node list")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level group ends at the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    # every bracketed range picks its first value, zero padding kept
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end])


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from Slurm's compressed list: ``2(x3),1`` -> 2 for nodes 0-2, 1 for node 3."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise DistributedSetupError(f"cannot read the tasks-per-node list {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise DistributedSetupError(f"node {node} is not in the tasks-per-node list {tasks_per_node!r}")
    return counts[node]


def port_for(key: str) -> int:
    """A rendezvous port every task derives alike from ``key`` (job and step id), in [20000, 60000)."""
    digest = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return _PORT_RANGE[0] + digest % (_PORT_RANGE[1] - _PORT_RANGE[0])


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from ``environ`` (default ``os.environ``).

    Pure: reads the mapping, changes nothing, so tests pass faked environments.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        if world > 1 and (not env.get("MASTER_ADDR") or port is None):
            raise DistributedSetupError("RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: "
                                        "start the program with torchrun (or set all four)")
        return DistEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world,
                       env.get("MASTER_ADDR"), port, "torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # a task of an srun step
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        node = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        job_step = f"{env.get('SLURM_JOB_ID', '0')}.{env.get('SLURM_STEP_ID', '0')}"
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_for(job_step)
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return DistEnv(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       tasks_on_node(per_node, node), env.get("MASTER_ADDR") or first_host(nodes), port, "slurm")
    if "SUBMITIT_LOCAL_GLOBALID" in env and "SUBMITIT_LOCAL_NTASKS" in env:
        world = _int(env, "SUBMITIT_LOCAL_NTASKS")
        port = (_int(env, "MASTER_PORT") if "MASTER_PORT" in env
                else port_for(f"local.{env.get('SUBMITIT_LOCAL_JOB_ID', '0')}"))
        return DistEnv(_int(env, "SUBMITIT_LOCAL_GLOBALID"), world, _int(env, "SUBMITIT_LOCAL_LOCALID"), world,
                       env.get("MASTER_ADDR", "127.0.0.1"), port, "submitit-local")
    note = ""
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        note = (f"this Slurm job has SLURM_NTASKS={env['SLURM_NTASKS']} but this process was not started by srun: "
                f"running as one process (start it with `srun python -m ...` to use every task)")
    return DistEnv(note=note)


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """True on the rank that reports (rank 0), decided from the environment alone: safe before any setup,
    e.g. to print a settings error once instead of once per rank. An unreadable environment counts as main."""
    try:
        return detect(environ).is_main
    except DistributedSetupError:
        return True


def shard(items: Iterable[Any], rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``items``: every ``world_size``-th item starting at ``rank``.

    Every item goes to exactly one rank, the split depends on nothing but (items, rank, world_size), and
    shares differ by at most one item (strided, so items that grow in cost along the list spread evenly).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard(rank={rank}, world_size={world_size}): need world_size >= 1 and 0 <= rank < "
                         f"world_size")
    seq = items if isinstance(items, Sequence) else list(items)
    return list(seq[rank::world_size])


def select_device(requested: str, env: DistEnv | None = None) -> torch.device:
    """The device of this rank (``env=None``: a single process): ``auto`` is CUDA when present, else the CPU;
    ``cuda`` means one GPU per local rank (``cuda:<local rank>``, or ``cuda:0`` when Slurm gave each task its own
    single GPU); asking for CUDA where there is none fails with the fix. Every app resolves its ``device`` here."""
    env = env if env is not None else DistEnv()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={requested!r} is invalid: expected auto, cpu, cuda or cuda:<index>")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} but no CUDA device is visible: use device=cpu or run on a GPU node")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device={requested!r} but only {count} CUDA device(s) are visible: use device=cuda:0 .. "
                         f"cuda:{count - 1}, or device=cuda")
    if env.world_size == 1:
        return device if device.index is not None else torch.device("cuda", min(env.local_rank, count - 1))
    if device.index is not None:
        raise ValueError(f"device={requested!r} with {env.world_size} ranks would put every rank of a node on one "
                         f"GPU: use device=cuda (each rank takes the GPU of its local rank)")
    if count == 1:
        return torch.device("cuda", 0)  # Slurm/CUDA_VISIBLE_DEVICES gave this task its own GPU
    if env.local_rank >= count:
        raise ValueError(f"local rank {env.local_rank} of {env.local_world_size} on this node but only {count} GPUs "
                         f"are visible: start one task per GPU (tasks_per_node={count} or --nproc_per_node {count})")
    return torch.device("cuda", env.local_rank)


def die_with_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """A worker started by torchrun's agent (``TORCHELASTIC_RUN_ID`` set) ends when that agent dies, even by
    ``kill -9`` (which gives the agent no chance to stop its workers): Linux's parent-death signal, SIGTERM.
    Returns True when it was set."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def _export(env: DistEnv) -> None:
    """torch's env:// rendezvous reads these; set only what is missing (torchrun already set them)."""
    values = {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
              "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
              "LOCAL_WORLD_SIZE": str(env.local_world_size)}
    for key, value in values.items():
        os.environ.setdefault(key, value)


class Session:
    """This process's place among the ranks, and the ways they meet. Make one with :func:`init`.

    ``barrier`` and ``gather`` run on a gloo group (CPU) on every device, so they take per-call
    timeouts and name the ranks that did not arrive.
    """

    def __init__(self, env: DistEnv, device: torch.device, backend: str | None, timeout_s: float, control=None):
        self.env, self.device, self.backend, self.timeout_s = env, device, backend, timeout_s
        self._control = control  # the gloo group (None: the default group is gloo already)
        self._closed = False

    rank = property(lambda self: self.env.rank)
    world_size = property(lambda self: self.env.world_size)
    local_rank = property(lambda self: self.env.local_rank)
    is_main = property(lambda self: self.env.is_main)

    def shard(self, items: Iterable[Any]) -> list:
        """This rank's share of ``items`` (see :func:`shard`)."""
        return shard(items, self.rank, self.world_size)

    def barrier(self, timeout_s: float | None = None) -> None:
        """Wait until every rank arrives; after ``timeout_s`` (default: the session's) fail naming the late ranks.

        A rank that died closes its connections, so the others fail at once rather than at the timeout.
        """
        if self._alone():
            return
        import torch.distributed as dist

        timeout = timedelta(seconds=self.timeout_s if timeout_s is None else timeout_s)
        try:
            dist.monitored_barrier(group=self._control, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as err:
            raise DistributedSetupError(f"rank {self.rank}: barrier of {self.world_size} ranks failed after at most "
                                        f"{timeout.total_seconds():.0f} s: {_first_line(err)}") from err

    def gather(self, obj: Any) -> list | None:
        """``obj`` of every rank, in rank order, on rank 0 (None on the others). ``obj`` must be JSON-able:
        what is gathered is what a ``metrics.json`` can hold, so it survives a restart the same way."""
        try:
            text = json.dumps(obj, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"gather() takes JSON-able results (dict, list, str, numbers): {err}") from err
        if self._alone():
            return [json.loads(text)]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(text, out, dst=0, group=self._control)
        return [json.loads(t) for t in out] if self.is_main else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (JSON-able, like :meth:`gather`): e.g. whether rank 0 could claim
        the run folder, so that every rank stops with the same one-line error."""
        text = json.dumps(obj, sort_keys=True)
        if self._alone():
            return json.loads(text)
        import torch.distributed as dist

        box = [text if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return json.loads(box[0])

    def _alone(self) -> bool:
        """True in a world of one (no group: nothing to wait for); a closed session refuses to meet."""
        if self._closed:
            raise DistributedSetupError("this session is closed: call distributed.init() again")
        return self.backend is None

    def close(self) -> None:
        """End this session. The process group stays up for the next :func:`init` in this process (a
        sweep run in-process under torchrun joins it again); :func:`shutdown` or the exit tears it down."""
        self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Session(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device}, backend={self.backend}, source={self.env.source})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


_GROUP: dict = {}  # the process group of this process: made by the first init(), reused by later ones


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
         environ: Mapping[str, str] | None = None) -> Session:
    """Join the other ranks (or stand alone in a world of one) and return the :class:`Session`.

    Use as ``with distributed.init(cfg.device) as session:``. ``timeout_s`` bounds the rendezvous and
    every collective: a rank that never starts makes the others fail with a message after that long
    instead of waiting forever. The group is made once per process and reused by later calls (torch
    cannot form a fresh group on torchrun's store after destroying one); it is torn down at exit.
    """
    env = detect(environ)
    if environ is None and env.distributed:
        die_with_launcher()
    if env.note and env.is_main:
        print(f"[distributed] {env.note}", file=sys.stderr)
    dev = select_device(device, env)
    if not env.distributed:
        return Session(env, dev, None, timeout_s)
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    key = (backend, env.rank, env.world_size)
    if dist.is_initialized():
        if _GROUP.get("key") != key:
            raise DistributedSetupError(f"this process already joined a process group that is not (backend, rank, "
                                        f"world) = {key}: use one device type per process")
        return Session(env, dev, backend, timeout_s, _GROUP["control"])
    _export(env)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    try:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except (RuntimeError, ValueError) as err:  # DistStoreError is a RuntimeError
        raise DistributedSetupError(
            f"rank {env.rank} of {env.world_size} ({env.source}) could not reach the other ranks at "
            f"{env.master_addr}:{env.master_port} within {timeout_s:.0f} s: {_first_line(err)}. Check that all "
            f"{env.world_size} tasks started (their logs), or set MASTER_PORT if that port is taken") from err
    if not _GROUP:
        atexit.register(shutdown)
    _GROUP.update(key=key, control=control)
    return Session(env, dev, backend, timeout_s, control)


def shutdown() -> None:
    """Tear down this process's process group (idempotent; runs at exit; safe after a peer died)."""
    import torch.distributed as dist

    if not _GROUP.get("key") or not dist.is_initialized():
        return
    try:
        if _GROUP.get("control") is not None:
            dist.destroy_process_group(_GROUP["control"])
        dist.destroy_process_group()
    except (RuntimeError, ValueError):
        pass  # a group broken by a dead peer: exit releases what is left
    _GROUP.update(key=None, control=None)
