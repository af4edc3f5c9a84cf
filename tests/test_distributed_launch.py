"""python -m taylorseer.harness.launch: torchrun's machinery, a failed rank reported in one line, exit status kept;
and a Hydra sweep run in-process under it (every run data-parallel over the same ranks)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from taylorseer.harness.launch import describe_failure

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "slurm_probe.py")
TOY = str(REPO / "tests" / "slurm_toy_app.py")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def launch(*args: str, log_dir: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m taylorseer.harness.launch --nproc_per_node 2 <args>`` (logs in ``log_dir``, else the launcher's
    default)."""
    logs = ["--log-dir", str(log_dir)] if log_dir is not None else []
    cmd = [sys.executable, "-m", "taylorseer.harness.launch", "--standalone", "--nproc_per_node", "2", *logs, *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def launch_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("[launch]")]


def test_settings_error_is_one_line_from_rank_0_with_its_status():
    result = launch(PROBE, "--mode", "setting-error")  # default log folder: a fresh one under the temp dir
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert out.count("[probe] error: items=-1 is invalid") == 2  # the app's line (rank 0 only) + the launcher's
    assert "ChildFailedError" not in out and "Traceback" not in out and "OMP_NUM_THREADS" not in out
    (line,) = launch_lines(result)
    assert line.startswith("[launch] rank 0 failed: [probe] error: items=-1 is invalid: expected >= 0 -- log: ")
    # whichever rank exits first, the agent stops the other: the status is the one a rank exited with
    assert re.search(r"\(rank 0 (exit code 2|killed by SIGTERM), rank 1 (exit code 2|killed by SIGTERM)\)$", line)
    assert "exit code 2" in line
    log = Path(line.split(" -- log: ")[1].split(" (")[0])
    assert log.name == "stderr.log" and log.parent.name == "0"
    assert "[probe] error: items=-1" in log.read_text()
    root = log.parents[3]
    assert root.name.startswith("taylorseer-launch-") and root.parent == Path(tempfile.gettempdir())
    shutil.rmtree(root)


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_crash_names_the_rank_that_raised_and_its_traceback_log(bad_rank, tmp_path):
    """The other rank fails too (its peer closed the connection); the one that raised is reported."""
    result = launch(PROBE, "--mode", "crash", "--bad-rank", str(bad_rank), log_dir=tmp_path)
    assert result.returncode == 1
    assert "ChildFailedError" not in result.stderr
    (line,) = launch_lines(result)
    assert line.startswith(f"[launch] rank {bad_rank} failed: RuntimeError: probe crashed on purpose on rank "
                           f"{bad_rank} -- log: ")
    log = Path(line.split(" -- log: ")[1].split(" (")[0])
    assert log.parent.name == str(bad_rank)
    assert "Traceback (most recent call last)" in log.read_text()  # the whole traceback stays in the log


def test_success_prints_no_report_and_keeps_explicit_options(tmp_path):
    out = tmp_path / "report.json"
    logs = tmp_path / "logs"
    result = launch(PROBE, "--out", str(out), "--items", "4", log_dir=logs)
    assert result.returncode == 0, result.stderr
    assert launch_lines(result) == []
    assert len(json.loads(out.read_text())["views"]) == 2
    assert sorted(p.parent.name for p in logs.glob("*/attempt_0/*/stderr.log")) == ["0", "1"]  # --log-dir kept


def _failure(rank: int, exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="<N/A>")


def _log(root: Path, rank: int, text: str) -> None:
    path = root / "run_x" / "attempt_0" / str(rank) / "stderr.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_describe_failure_prefers_the_rank_that_said_why(tmp_path):
    _log(tmp_path, 0, "[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: [pair.cc:561] "
                      "Connection closed by peer [127.0.0.1]:1234\n")
    _log(tmp_path, 1, "Traceback (most recent call last):\n  File x\nKeyError: 'prompt'\n")
    line, status = describe_failure({0: _failure(0, 1), 1: _failure(1, -15)}, tmp_path)
    assert line.startswith("[launch] rank 1 failed: KeyError: 'prompt' -- log: ")
    assert line.endswith("/run_x/attempt_0/1/stderr.log (rank 0 exit code 1, rank 1 killed by SIGTERM)")
    assert status == 1  # the status of the rank that exited with an error by itself


def test_describe_failure_without_logs(tmp_path):
    line, status = describe_failure({3: _failure(1, -9)}, None)
    assert line == ("[launch] rank 3 failed: it printed no error -- no log file (pass --tee 3 to keep one) "
                    "(rank 3 killed by SIGKILL)")
    assert status == 128 + 9


def test_sweep_in_process_under_the_launcher(tmp_path):
    """Hydra's basic launcher under `taylorseer.harness.launch`: every run of the sweep joins the same 2 ranks (the
    process group is made once per process and reused)."""
    result = launch(TOY, "--multirun", f"out_root={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    "a=1,2", "num_items=5", log_dir=tmp_path / "logs", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for a in (1, 2):
        summary = json.loads((tmp_path / "toy" / f"a{a}-b1" / "summary.json").read_text())
        assert summary["world_size"] == 2
        assert [(r["rank"], r["made"], r["source"]) for r in summary["ranks"]] == [
            (0, [0, 2, 4], "torchrun"), (1, [1, 3], "torchrun")]


def test_local_launcher_runs_each_job_on_its_tasks_and_reports_failures(tmp_path):
    """`hydra/launcher=local` (submitit's local executor): a job's 2 tasks are 2 gloo ranks, and a failed
    job comes back with its traceback and log path, as on Slurm."""
    sys.path.insert(0, str(REPO / "tests"))
    from slurm_sweep import submit_sweep

    result = submit_sweep(TOY, ["a=4", "num_items=5", "fail=false,true", "hydra.launcher.tasks_per_node=2"],
                          launcher="local", out_root=tmp_path, timeout=300, extra_env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    summary = json.loads((tmp_path / "toy" / "a4-b1" / "summary.json").read_text())
    assert [(r["rank"], r["made"], r["source"]) for r in summary["ranks"]] == [
        (0, [0, 2, 4], "submitit-local"), (1, [1, 3], "submitit-local")]
    failed = result.job_ids[1]
    m = re.search(rf"JobFailedError: job {failed} task 0 of 2 \(.*fail=True\) failed: RuntimeError: toy run a=4 b=1 "
                  rf"fails on purpose -- log: (\S+) \(task t: (\S+)\)", result.stderr)
    assert m, result.stderr[-3000:]
    assert Path(m.group(1)) == result.log(failed) and m.group(2).endswith(f"{failed}_<t>_log.err")
    assert "--- the job's traceback ---" in result.stderr
    assert json.loads((result.sweep_dir / "1" / "job_failed.json").read_text())["error_type"] == "RuntimeError"


def test_describe_failure_names_the_rank_that_aborted_not_the_one_the_agent_stopped(tmp_path):
    """A rank killed by SIGABRT in native code (its last words are the C++ runtime's) is the one that failed; the
    peer the agent stopped by SIGTERM afterwards only printed a warning, which is no error."""
    _log(tmp_path, 0, "[default0]:UserWarning: split will not be applied.\n"
                      "[default0]:terminate called without an active exception\n"
                      "[default0]:Fatal Python error: Aborted\n"
                      "[default0]:Current thread 0x1 (most recent call first):\n"
                      '[default0]:  File "worker.py", line 82 in main\n')
    _log(tmp_path, 1, "[default1]:  return funcol.all_gather_tensor(tensor, dim, group=group)\n")
    os.utime(tmp_path / "run_x" / "attempt_0" / "1" / "stderr.log", (1, 1))  # rank 1's log was written first
    line, status = describe_failure({0: _failure(0, -6), 1: _failure(1, -15)}, tmp_path)
    assert line.startswith("[launch] rank 0 failed: terminate called without an active exception -- log: ")
    assert line.endswith("(rank 0 killed by SIGABRT, rank 1 killed by SIGTERM)")
    assert status == 128 + 6


def test_children_get_the_fault_handler_unless_the_user_set_it(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nprint('FH=' + os.environ.get('PYTHONFAULTHANDLER', '-') + ';')\n")
    for env, expected in (({}, "FH=1;"), ({"PYTHONFAULTHANDLER": ""}, "FH=;")):
        base = {k: v for k, v in _env().items() if k != "PYTHONFAULTHANDLER"}
        run = subprocess.run([sys.executable, "-m", "taylorseer.harness.launch", "--standalone", "--nproc_per_node",
                              "1", str(probe)], env={**base, **env}, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert expected in run.stdout


@pytest.mark.parametrize("option,value,said", [("--nproc_per_node", "two", "Unsupported nproc_per_node value: two"),
                                               ("--nnodes", "1:x", "invalid literal for int()")])
def test_a_bad_launch_option_is_one_line_before_any_rank_starts(option, value, said):
    cmd = [sys.executable, "-m", "taylorseer.harness.launch", "--standalone", option, value, PROBE]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"[launch] error: an option is invalid: {said}") and "--nproc_per_node N" in line


def test_a_stopped_launch_stops_every_rank_and_says_so_in_one_line(tmp_path):
    """scancel or Ctrl-C on the launcher: every rank is stopped, one line says so, status 128 + the signal."""
    import signal
    import time

    script = tmp_path / "wait.py"
    script.write_text("import os, pathlib, sys, time\n"
                      "pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(str(os.getpid()))\n"
                      "time.sleep(120)\n")
    cmd = [sys.executable, "-m", "taylorseer.harness.launch", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not all((tmp_path / r).exists() for r in "01") and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [int((tmp_path / r).read_text()) for r in "01"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("[launch]")]
    assert line.startswith("[launch] stopped by SIGTERM: every rank was stopped")
    for pid in ranks:
        try:
            os.kill(pid, 0)
            alive = not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except (ProcessLookupError, FileNotFoundError):
            alive = False
        assert not alive, f"rank process {pid} outlived the launcher"
