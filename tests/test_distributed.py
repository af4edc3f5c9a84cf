"""taylorseer.harness.distributed: rank/world/device from torchrun, Slurm and submitit environments, shard, and
real 2-process gloo groups (torchrun, and the Slurm path with faked Slurm variables), all bounded."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from taylorseer.harness import distributed
from taylorseer.harness.distributed import DistEnv, DistributedSetupError, detect, first_host, shard, tasks_on_node

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "slurm_probe.py")


def slurm_step_env(rank, world=4, node=0, local=None, job="4242", step="0", nodelist="gpu[03-04]",
                   per_node="2(x2)"):
    """What srun sets in each task of a step (as seen on the real local cluster, tests/test_slurm.py)."""
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
            "SLURM_STEP_NUM_TASKS": str(world), "SLURM_LOCALID": str(rank % 2 if local is None else local),
            "SLURM_NODEID": str(node), "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_STEP_TASKS_PER_NODE": per_node}


# ---- reading the environment ------------------------------------------------------------------------------

def test_plain_process_is_a_world_of_one():
    assert detect({}) == DistEnv(0, 1, 0, 1, None, None, "single", "")
    assert distributed.is_main_process({})


def test_torchrun_variables():
    env = detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node7", "MASTER_PORT": "29500"})
    assert env == DistEnv(3, 8, 1, 2, "node7", 29500, "torchrun", "")
    assert not env.is_main and env.distributed
    assert not distributed.is_main_process({"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_torchrun_with_one_process_still_joins_a_group():
    env = detect({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert env.distributed and env.world_size == 1
    assert not detect({}).distributed


def test_torchrun_variables_win_over_slurm_ones():
    """`srun torchrun ...`: the processes torchrun starts carry both; torchrun's view is the true one."""
    env = detect({**slurm_step_env(0), "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "n0",
                  "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (5, 16, 5, "torchrun")


def test_incomplete_torchrun_variables_say_how_to_start():
    with pytest.raises(DistributedSetupError, match="start the program with torchrun"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})
    assert distributed.is_main_process({"RANK": "0", "WORLD_SIZE": "2"})  # still prints its error


def test_slurm_step_of_two_nodes():
    envs = [detect(slurm_step_env(r, node=r // 2)) for r in range(4)]
    assert [(e.rank, e.world_size, e.local_rank, e.local_world_size) for e in envs] == [
        (0, 4, 0, 2), (1, 4, 1, 2), (2, 4, 0, 2), (3, 4, 1, 2)]
    assert {e.master_addr for e in envs} == {"gpu03"}  # the first node of the step hosts rank 0
    assert len({e.master_port for e in envs}) == 1  # every task derives the same port without talking
    assert all(e.source == "slurm" for e in envs)
    port = envs[0].master_port
    assert 20000 <= port < 60000
    assert detect(slurm_step_env(0, step="1")).master_port != port  # two steps of one job: two groups
    assert detect(slurm_step_env(0, job="4243")).master_port != port
    assert detect({**slurm_step_env(0), "MASTER_PORT": "31000"}).master_port == 31000


def test_slurm_batch_script_is_one_process_with_a_note():
    """In the batch script (no srun) SLURM_NTASKS counts the allocation but only one process runs."""
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_JOB_NODELIST": "localhost"}  # what the real batch step had (no SLURM_STEP_*)
    env = detect(batch)
    assert (env.world_size, env.source) == (1, "single")
    assert "SLURM_NTASKS=4" in env.note and "srun" in env.note


def test_submitit_local_tasks():
    env = detect({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
                  "SUBMITIT_LOCAL_JOB_ID": "9876"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (
        1, 2, 1, "127.0.0.1", "submitit-local")
    assert env.master_port == distributed.port_for("local.9876")


@pytest.mark.parametrize("nodelist, first", [
    ("localhost", "localhost"), ("gpu[03-05,9]", "gpu03"), ("gpu[12,3]", "gpu12"), ("a1,b[1-2]", "a1"),
    ("rack[2-3]-n[007-009],x1", "rack2-n007"), (" node5 ", "node5")])
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(DistributedSetupError, match="node 4"):
        tasks_on_node("2(x3),1", 4)
    with pytest.raises(DistributedSetupError, match="cannot read"):
        tasks_on_node("2x3", 0)


# ---- shard ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 10, 50])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_gives_every_item_to_exactly_one_rank(n, world):
    items = [f"prompt {i}" for i in range(n)]
    shares = [shard(items, r, world) for r in range(world)]
    assert sorted(x for s in shares for x in s) == sorted(items)  # nothing lost, nothing twice
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert shares == [shard(list(items), r, world) for r in range(world)]  # a function of (items, rank, world)
    assert shares == [shard(iter(items), r, world) for r in range(world)]  # any iterable


def test_shard_is_strided():
    assert shard(range(10), 1, 4) == [1, 5, 9]


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="world_size >= 1"):
        shard([1, 2], 0, 0)


# ---- a world of one ---------------------------------------------------------------------------------------

def test_single_session_needs_no_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SUBMITIT_LOCAL_GLOBALID"):
        monkeypatch.delenv(key, raising=False)
    with distributed.init("cpu") as session:
        assert (session.rank, session.world_size, session.backend, session.device) == (0, 1, None, torch.device("cpu"))
        session.barrier()
        assert session.gather({"made": [1, 2]}) == [{"made": [1, 2]}]
        assert session.shard(range(3)) == [0, 1, 2]
        with pytest.raises(ValueError, match="JSON-able"):
            session.gather({"tensor": torch.zeros(1)})
    with pytest.raises(DistributedSetupError, match="closed"):
        session.barrier()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ValueError, match="use device=cpu"):
        distributed.select_device("cuda", DistEnv())
    assert distributed.select_device("auto", DistEnv()) == torch.device("cpu")


@pytest.mark.gpu
def test_one_gpu_per_local_rank():
    """On a GPU node: every rank takes the GPU of its local rank, or GPU 0 when it sees only its own."""
    count = torch.cuda.device_count()
    two = DistEnv(1, 2, 1, 2, "h", 1, "slurm")
    assert distributed.select_device("cuda", two) == torch.device("cuda", 1 if count > 1 else 0)
    assert distributed.select_device("auto", DistEnv()) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="use device=cuda \\(each rank takes the GPU of its local rank\\)"):
        distributed.select_device("cuda:0", two)


@pytest.mark.gpu
def test_nccl_group_under_torchrun(tmp_path):
    """The GPU path: nccl for the default group (one GPU per local rank), gloo for barrier and gather."""
    out = tmp_path / "report.json"
    nproc = str(torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, PROBE,
           "--out", str(out), "--items", "5", "--device", "cuda", "--timeout", "120"]
    result = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    views = json.loads(out.read_text())["views"]
    assert [(v["rank"], v["backend"], v["device"]) for v in views] == [
        (r, "nccl", f"cuda:{r}") for r in range(int(nproc))]
    assert {v["total_items"] for v in views} == {5}  # an all-reduce of CUDA tensors over nccl


# ---- two real processes -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_two_gloo_ranks_under_torchrun(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PROBE,
           "--out", str(out), "--items", "11", "--timeout", "60"]
    subprocess.run(cmd, check=True, env=_clean_env(), capture_output=True, timeout=180)
    views = json.loads(out.read_text())["views"]
    assert [v["rank"] for v in views] == [0, 1]
    assert [v["items"] for v in views] == [list(range(0, 11, 2)), list(range(1, 11, 2))]
    assert {v["total_items"] for v in views} == {11}  # an all-reduce over the group
    assert {(v["world_size"], v["source"], v["backend"]) for v in views} == {(2, "torchrun", "gloo")}
    assert len({v["pid"] for v in views}) == 2


def test_two_gloo_ranks_from_slurm_variables(tmp_path):
    """The Slurm path without Slurm: two processes with the variables srun would set meet on the port
    they both derive from the job and step ids."""
    out = tmp_path / "report.json"
    job = str(os.getpid())  # fake job id; the port follows from it
    procs = []
    for rank in range(2):
        env = _clean_env(**slurm_step_env(rank, world=2, local=rank, job=job, nodelist="localhost", per_node="2"))
        args = [sys.executable, PROBE, "--items", "5", "--timeout", "60"] + (["--out", str(out)] if rank == 0 else [])
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()
    views = json.loads(out.read_text())["views"]
    assert [(v["rank"], v["local_rank"], v["source"], v["items"]) for v in views] == [
        (0, 0, "slurm", [0, 2, 4]), (1, 1, "slurm", [1, 3])]
    assert {v["master"] for v in views} == {f"localhost:{distributed.port_for(f'{job}.0')}"}


def test_missing_rank_fails_within_the_timeout():
    """Rank 0 of 2 alone: the rendezvous gives up after timeout_s with a message, not a hang."""
    env = _clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    start = time.monotonic()
    result = subprocess.run([sys.executable, PROBE, "--timeout", "3"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "DistributedSetupError: rank 0 of 2 (torchrun) could not reach the other ranks" in result.stderr
    assert "within 3 s" in result.stderr
    assert time.monotonic() - start < 60


def test_late_rank_fails_the_barrier_naming_it(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PROBE,
           "--mode", "late", "--bad-rank", "1", "--sleep", "30", "--barrier-timeout", "2", "--timeout", "60"]
    start = time.monotonic()
    result = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "rank 0: barrier of 2 ranks failed after at most 2 s" in result.stderr
    assert "Ranks 1 failed to pass monitoredBarrier" in result.stderr
    assert time.monotonic() - start < 25  # not the 30 s the late rank sleeps


def test_barrier_waits_longer_than_the_group_timeout(tmp_path):
    """A barrier's own timeout may exceed the group's: ranks that finish their shard early wait for the rest."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PROBE,
           "--out", str(out), "--mode", "late", "--sleep", "6", "--timeout", "3", "--barrier-timeout", "60"]
    subprocess.run(cmd, check=True, env=_clean_env(), capture_output=True, timeout=180)
    assert len(json.loads(out.read_text())["views"]) == 2
