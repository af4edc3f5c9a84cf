"""Against a REAL Slurm (a private one-node cluster, the ``slurm_cluster`` fixture): sweeps through
``hydra/launcher=slurm``, preemption and requeue, a failing job, 2 tasks as 2 gloo ranks, and bounded waits.

Without Slurm (or root) these tests skip with the apt-get line that enables them; .ci/run installs it.
Each test prints what the cluster did (job ids, states, seconds): run with ``-s`` to see it.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import APT_LINE, why_unavailable  # noqa: E402
from slurm_sweep import Sweep, SweepError, submit_sweep  # noqa: E402
from slurm_toy_app import value  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "tests" / "slurm_toy_app.py")
PROBE = str(REPO / "tests" / "slurm_probe.py")

pytestmark = pytest.mark.slurm


def report(name: str, result) -> None:
    states = {job_id: (info.get("JobState"), info.get("ExitCode"), info.get("Restarts"))
              for job_id, info in result.jobs.items()}
    print(f"\n[slurm] {name}: {result.seconds:.1f} s, jobs {states}")


def made_lines(run_dir: Path) -> list[tuple[int, int, int]]:
    """(item, rank, attempt) for every item a run made, in the order made."""
    return [tuple(map(int, line.split())) for line in (run_dir / "made.log").read_text().splitlines()]


def check_items(run_dir: Path, a: int, b: int, num_items: int) -> None:
    """Every item is there once, with the value the run must give it."""
    files = sorted((run_dir / "items").glob("*.json"))
    assert [f.name for f in files] == [f"{i:04d}.json" for i in range(num_items)]
    assert [json.loads(f.read_text())["value"] for f in files] == [value(a, b, i) for i in range(num_items)]
    made = [item for item, _, _ in made_lines(run_dir)]
    assert sorted(made) == list(range(num_items))  # nothing lost, nothing made twice


def test_launcher_configs_compose_with_commented_values():
    """`hydra/launcher=slurm|local` compose onto hydra-submitit-launcher's typed configs (a misspelt key
    fails), switch the failure callback on, and every value a user sets carries a comment."""
    from hydra import compose, initialize_config_dir

    overrides = {"slurm": ["hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                           "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                           "hydra.launcher.setup=[module load cuda]"],
                 "local": ["hydra.launcher.tasks_per_node=2"]}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        for name, extra in overrides.items():
            cfg = compose("base", overrides=[f"hydra/launcher={name}", *extra], return_hydra_config=True)
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith(f"{name.capitalize()}Launcher")
            assert cfg.hydra.callbacks.sweep_failures._target_ == "taylorseer.harness.slurm_launcher.SweepFailures"
            assert launcher.submitit_folder.endswith("/.submitit/%j")
            if name == "slurm":
                assert (launcher.partition, launcher.account, launcher.gpus_per_node, launcher.tasks_per_node,
                        list(launcher.setup)) == ("gpu", "proj", 8, 8, ["module load cuda"])
            else:
                assert launcher.tasks_per_node == 2
            text = (REPO / "configs" / "hydra" / "launcher" / f"{name}.yaml").read_text()
            settings = [line for line in text.splitlines() if re.match(r"^[a-z_]+:", line) and line != "defaults:"]
            assert len(settings) >= (14 if name == "slurm" else 4)
            assert [line for line in settings if "#" not in line] == []
    with pytest.raises(Exception, match="partiton"), initialize_config_dir(config_dir=str(REPO / "configs"),
                                                                           version_base=None):
        compose("base", overrides=["hydra/launcher=slurm", "hydra.launcher.partiton=gpu"], return_hydra_config=True)


def test_job_resources_follow_the_run():
    """By default a job requests K = parallel.ulysses x parallel.ring tasks per node and one GPU per task (none with
    device=cpu); an explicit tasks_per_node (a multiple of K: data parallel x context parallel) carries the GPUs."""
    from hydra import compose, initialize_config_dir

    cases = {(): (1, 1), ("parallel.ulysses=4",): (4, 4), ("parallel.ulysses=2", "parallel.ring=2"): (4, 4),
             ("parallel.ulysses=2", "device=cpu"): (2, None),
             ("parallel.ulysses=4", "hydra.launcher.tasks_per_node=8"): (8, 8),
             ("hydra.launcher.gpus_per_node=null",): (1, None)}
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        for launcher in ("slurm", "local"):
            for extra, expected in cases.items():
                cfg = compose("sample_flux", overrides=[f"hydra/launcher={launcher}", *extra],
                              return_hydra_config=True)
                got = (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node)
                assert got == expected, (launcher, extra, got)
        cfg = compose("sample_dit_ddp", overrides=["hydra/launcher=slurm"], return_hydra_config=True)  # no parallel
        assert (cfg.hydra.launcher.tasks_per_node, cfg.hydra.launcher.gpus_per_node) == (1, 1)


@pytest.mark.parametrize("overrides, says", [
    (["parallel.ulysses=1,2,4", "hydra.launcher.tasks_per_node=2"],
     r"1 of 3 jobs cannot run .*\n  #2 \(parallel\.ulysses=4\): one generation takes parallel\.ulysses x "
     r"parallel\.ring = 4 ranks, but hydra\.launcher\.nodes=1 x tasks_per_node=2 = 2 ranks\n"
     r"Fix: .* set tasks_per_node to a multiple of 4 \(every run of this sweep\)"),
    (["device=auto", "parallel.ulysses=2", "hydra.launcher.gpus_per_node=1"],
     r"#0 \(device=auto parallel\.ulysses=2\): a GPU run takes one GPU per rank, but "
     r"hydra\.launcher\.gpus_per_node=1 < tasks_per_node=2"),
])
def test_resources_that_cannot_host_a_run_are_refused_before_submission(tmp_path, overrides, says):
    """No cluster needed: the sweep stops before sbatch runs, and says how to fix it."""
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run([sys.executable, TOY, "--multirun", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep_dir}",
                             *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert re.search(f"^\\[sweep\\] error: .*{says}", result.stderr, re.DOTALL | re.M), result.stderr[-3000:]
    assert "Traceback" not in result.stderr  # the message alone
    assert "nothing was submitted" in result.stderr and not (sweep_dir / ".submitit").exists()


def test_sweep_over_degrees_is_one_job_array_per_resources(slurm_cluster, tmp_path):
    """`parallel.ulysses=1,2` on a "GPU run" (device=auto; the test node's GPUs are placeholders): two job arrays,
    of 1 task + 1 GPU and 2 tasks + 2 GPUs, each job as many ranks as its run needs."""
    result = submit_sweep(TOY, ["a=2", "b=2", "num_items=4", "device=auto", "parallel.ulysses=1,2",
                                "hydra.launcher.cpus_per_task=1"], slurm_cluster, out_root=tmp_path, timeout=300)
    report("sweep over parallel.ulysses=1,2", result)
    assert result.returncode == 0, result.stderr[-3000:]
    arrays = [job_id.split("_")[0] for job_id in result.job_ids]  # submitit submits an array of one as a job
    assert len(result.job_ids) == 2 and len(set(arrays)) == 2  # one array per set of resources
    for array, degree in zip(arrays, (1, 2), strict=True):
        script = (result.sweep_dir / ".submitit" / array / f"{array}_submission.sh").read_text().splitlines()
        for line in (f"#SBATCH --ntasks-per-node={degree}", f"#SBATCH --gpus-per-node={degree}"):
            assert line in script, (degree, line)
    assert [result.jobs[j]["NumTasks"] for j in result.job_ids] == ["1", "2"]
    assert {info["JobState"] for info in result.jobs.values()} == {"COMPLETED"}
    for name, degree in (("a2-b2", 1), ("a2-b2-k2", 2)):
        check_items(tmp_path / "toy" / name, 2, 2, 4)
        summary = json.loads((tmp_path / "toy" / name / "summary.json").read_text())
        assert (summary["world_size"], summary["gpus_on_node"]) == (degree, str(degree))


def test_context_parallel_job_is_one_generation_on_k_ranks(slurm_cluster, tmp_path):
    """The FLUX app with parallel.ulysses=2 through `hydra/launcher=slurm`, nothing else set: the job requests 2
    tasks and 2 GPUs (placeholders: the ranks run on the CPU, gloo), both ranks make each image from their half of
    the tokens, and the images are a one-process run's (to float rounding), each rank holding half the factors."""
    run = ["model=digits_flux", "height=32", "width=32", "num_steps=10", "progress=false", "warmup=false",
           "prompt=[digit 3,digit 7]"]
    result = submit_sweep("taylorseer_flux.sample", [*run, "parallel.ulysses=2", "hydra.launcher.cpus_per_task=1"],
                          slurm_cluster, out_root=tmp_path / "cp", timeout=600)
    report("FLUX, parallel.ulysses=2", result)
    assert result.returncode == 0, result.stderr[-3000:]
    (job_id,) = result.job_ids
    script = (result.sweep_dir / ".submitit" / job_id / f"{job_id}_submission.sh").read_text().splitlines()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --gpus-per-node=2" in script
    assert (result.jobs[job_id]["NumTasks"], result.jobs[job_id]["JobState"]) == ("2", "COMPLETED")
    single = subprocess.run([sys.executable, "-m", "taylorseer_flux.sample", *run, "device=cpu",
                             f"out_root={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    (split,) = (tmp_path / "cp" / "flux").iterdir()
    (whole,) = (tmp_path / "one" / "flux").iterdir()
    assert split.name == whole.name  # the run's identity does not depend on how it was split
    cp, one = (json.loads((folder / "metrics.json").read_text()) for folder in (split, whole))
    assert (cp["context_parallel"], one["context_parallel"]) == (2, 1)
    assert cp["cache_bytes_per_rank"] == [one["cache_bytes_per_rank"][0] // 2] * 2
    images = sorted(p.name for p in whole.glob("*.png"))
    assert images == sorted(p.name for p in split.glob("*.png")) and len(images) == 2
    for name in images:
        a, b = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (split, whole))
        assert np.abs(a - b).max() <= 1, name  # 8-bit images of outputs equal to float rounding


def test_the_failure_callback_registers_the_launchers_hydra_did_not_list():
    """A PEP 660 editable install leaves hydra_plugins.taylorseer_launchers importable but unlisted: the callback,
    made before the launcher, registers it by class."""
    from hydra.core.plugins import Plugins

    from taylorseer.harness.slurm_launcher import SweepFailures

    registry = Plugins.instance().class_name_to_class
    names = [f"hydra_plugins.taylorseer_launchers.launchers.{kind}Launcher" for kind in ("Slurm", "Local")]
    saved = {name: registry.pop(name, None) for name in names}
    try:
        SweepFailures()
        assert all(name in registry for name in names)
    finally:
        registry.update({name: cls for name, cls in saved.items() if cls is not None})


def test_skip_reason_says_how_to_enable_slurm():
    reason = why_unavailable(path="/nonexistent")
    assert "Slurm programs not installed (slurmctld, slurmd" in reason
    assert f"`{APT_LINE}`" in reason and "root" in reason


def test_srun_step_of_two_tasks_forms_a_gloo_group(slurm_cluster, tmp_path):
    """A plain Slurm step (no submitit): taylorseer.harness.distributed reads srun's variables."""
    out = tmp_path / "report.json"
    start = time.monotonic()
    slurm_cluster.run("srun", "-n2", "-t", "5", sys.executable, PROBE, "--out", str(out), "--items", "6",
                      "--timeout", "60", timeout=180)
    views = json.loads(out.read_text())["views"]
    print(f"\n[slurm] srun -n2 probe: {time.monotonic() - start:.1f} s, master {views[0]['master']}")
    assert [(v["rank"], v["local_rank"], v["world_size"], v["local_world_size"], v["source"], v["items"])
            for v in views] == [(0, 0, 2, 2, "slurm", [0, 2, 4]), (1, 1, 2, 2, "slurm", [1, 3, 5])]
    assert {v["total_items"] for v in views} == {6} and {v["backend"] for v in views} == {"gloo"}
    assert views[0]["master"].startswith("localhost:")


def test_sweep_2x2_completes(slurm_cluster, tmp_path):
    """Cluster settings are plain overrides: partition, setup lines (run before the tasks start), time."""
    result = submit_sweep(TOY, ["a=1,2", "b=1,2", "num_items=4", f"hydra.launcher.partition={slurm_cluster.partition}",
                                "hydra.launcher.setup=[\"export TOY_SETUP=loaded\"]", "hydra.launcher.timeout_min=30"],
                          slurm_cluster, out_root=tmp_path, timeout=300)
    report("2x2 sweep", result)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.job_ids) == 4 and len({j.split("_")[0] for j in result.job_ids}) == 1  # one job array
    array = result.job_ids[0].split("_")[0]
    script = (result.sweep_dir / ".submitit" / array / f"{array}_submission.sh").read_text()
    for line in (f"#SBATCH --partition={slurm_cluster.partition}", "#SBATCH --time=30", "#SBATCH --signal=USR2@120",
                 "#SBATCH --array=0-3%4", "#SBATCH --ntasks-per-node=1", "export TOY_SETUP=loaded"):
        assert line in script.splitlines(), line
    assert "--gpus-per-node" not in script  # the toy runs with device=cpu: no GPU requested
    assert {info["Partition"] for info in result.jobs.values()} == {slurm_cluster.partition}
    assert {info["JobState"] for info in result.jobs.values()} == {"COMPLETED"}
    for a in (1, 2):
        for b in (1, 2):
            run_dir = tmp_path / "toy" / f"a{a}-b{b}"
            check_items(run_dir, a, b, 4)
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["world_size"] == 1 and summary["job_id"] in {i["JobId"] for i in result.jobs.values()}
            assert summary["setup"] == "loaded"
    assert not list(result.sweep_dir.rglob("job_failed.json"))


@pytest.mark.parametrize("tasks", [1, 2])
def test_preempted_job_resumes_without_lost_or_duplicated_items(slurm_cluster, tmp_path, tasks):
    """Preemption as Slurm does it (TERM, then USR2 to the job's tasks): submitit checkpoints and requeues
    the job; the run restarts and makes only the missing items."""
    num_items = 10
    run_dir = tmp_path / "toy" / "a7-b7"
    sweep = Sweep(TOY, ["a=7", "b=7", f"num_items={num_items}", "item_seconds=1",
                        f"hydra.launcher.tasks_per_node={tasks}", "hydra.launcher.cpus_per_task=1"],
                  slurm_cluster, out_root=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((run_dir / "items").glob("*.json"))) < 3:
        time.sleep(0.2)
    (job_id,) = sweep.job_ids()
    before = len(list((run_dir / "items").glob("*.json")))
    assert 3 <= before < num_items, "the job should be interrupted part-way"
    signalled = time.monotonic()
    slurm_cluster.run("scancel", "--signal=TERM", job_id)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    result = sweep.wait(timeout=300)
    report(f"preempted job ({tasks} task(s)), {time.monotonic() - signalled:.1f} s from signal to end", result)
    assert result.returncode == 0, result.stderr[-3000:]
    info = result.jobs[job_id]
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1")
    check_items(run_dir, 7, 7, num_items)
    attempts = {attempt for _, _, attempt in made_lines(run_dir)}
    assert attempts == {0, 1}  # part made before the requeue, the rest after it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["attempt"], summary["world_size"]) == (1, tasks)
    log = result.log(job_id, stream="out").read_text()  # both attempts append to the same log
    assert "this job is preempted" in log and f"Requeued job {job_id}" in log  # submitit's own account
    assert log.count("- Starting with JobEnvironment") == 2 and log.count("- Job completed successfully") == 1


def test_failed_job_surfaces_its_traceback_and_log(slurm_cluster, tmp_path):
    result = submit_sweep(TOY, ["a=1", "b=5", "num_items=2", "fail=false,true"], slurm_cluster, out_root=tmp_path,
                          timeout=300)
    report("sweep with a failing job", result)
    assert result.returncode == 1
    failed = result.job_ids[1]
    m = re.search(rf"JobFailedError: job {failed} \(.*fail=True\) failed: RuntimeError: toy run a=1 b=5 fails on "
                  rf"purpose -- log: (\S+)", result.stderr)
    assert m, result.stderr[-3000:]
    assert Path(m.group(1)) == result.log(failed)
    after = result.stderr.split("--- the job's traceback ---", 1)[1]
    assert "Traceback (most recent call last)" in after and "RuntimeError: toy run a=1 b=5" in after
    assert f"[sweep] job {failed} " in result.log(failed).read_text()  # the job's own log says it too
    record = json.loads((result.sweep_dir / "1" / "job_failed.json").read_text())
    assert (record["job_id"], record["error_type"], record["stderr"]) == (failed, "RuntimeError", m.group(1))
    assert "fail=True" in record["overrides"]
    check_items(tmp_path / "toy" / "a1-b5", 1, 5, 2)  # the other run of the sweep completed
    # A job whose Python raised ends FAILED (it used to end COMPLETED: Hydra and submitit catch the error).
    assert result.jobs[failed]["JobState"] == "FAILED" and result.jobs[result.job_ids[0]]["JobState"] == "COMPLETED"


def test_two_tasks_of_one_job_are_two_gloo_ranks(slurm_cluster, tmp_path):
    result = submit_sweep(TOY, ["a=3", "b=3", "num_items=7", "hydra.launcher.tasks_per_node=2",
                                "hydra.launcher.cpus_per_task=1"], slurm_cluster, out_root=tmp_path, timeout=300)
    report("one job, 2 tasks", result)
    assert result.returncode == 0, result.stderr[-3000:]
    (job_id,) = result.job_ids
    assert result.jobs[job_id]["NumTasks"] == "2"
    run_dir = tmp_path / "toy" / "a3-b3"
    check_items(run_dir, 3, 3, 7)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert [(r["rank"], r["made"], r["source"]) for r in summary["ranks"]] == [
        (0, [0, 2, 4, 6], "slurm"), (1, [1, 3, 5], "slurm")]
    assert {rank for _, rank, _ in made_lines(run_dir)} == {0, 1}
    assert result.log(job_id, task=1).exists()  # every task has its own log


def test_job_killed_without_result_fails_the_wait_instead_of_hanging(slurm_cluster, tmp_path):
    """Without accounting submitit cannot see a job that was killed: the bounded wait must."""
    run_dir = tmp_path / "toy" / "a9-b9"
    sweep = Sweep(TOY, ["a=9", "b=9", "num_items=60", "item_seconds=1"], slurm_cluster, out_root=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((run_dir / "items").glob("*.json")):
        time.sleep(0.2)
    (job_id,) = sweep.job_ids()
    killed = time.monotonic()
    slurm_cluster.run("scancel", job_id)
    with pytest.raises(SweepError, match="every job left the queue 5 s ago but the sweep still waits") as err:
        sweep.wait(timeout=300, orphan_grace_s=5)
    print(f"\n[slurm] hard-killed job {job_id}: the wait gave up {time.monotonic() - killed:.1f} s after scancel")
    assert f"job {job_id}: state CANCELLED" in str(err.value)
    assert time.monotonic() - killed < 60
    assert sweep.proc.poll() is not None  # the hung sweep process was stopped


def test_cluster_stops_cleanly(tmp_path):
    """A second private cluster starts beside the session's and stops without leaving a daemon alive."""
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    from slurm_cluster import SlurmCluster, _alive

    cluster = SlurmCluster().start(timeout=90)
    pids = list(cluster._pids().values())
    assert len(pids) == 3 and all(_alive(p) for p in pids)  # munged, slurmctld, slurmd
    out = cluster.run("sbatch", "--wrap", "sleep 300", "-o", str(tmp_path / "sleep.out")).stdout
    job_id = out.split()[-1]
    assert cluster.queue() == [job_id]
    cluster.stop(timeout=60, remove=True)
    print(f"\n[slurm] second cluster: {cluster.describe()}")
    assert not cluster.root.exists()
    assert not any(_alive(p) for p in pids)
    assert cluster.timings["killed"] == 0  # scontrol shutdown sufficed
    assert subprocess.run(["pgrep", "-f", str(cluster.conf)], capture_output=True).stdout == b""
