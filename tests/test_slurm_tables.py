"""The digits table on a REAL Slurm (the ``slurm_cluster`` fixture): the sweep submitted through
``hydra/launcher=slurm`` completes and aggregates; a preempted sampling job resumes with every sample made
once; a failing point surfaces its error and is marked failed in the table. Run with -s for job ids/states."""

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_sweep import Sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slurm


def _indices(run: Path) -> list[int]:
    out = []
    for f in sorted((run / "records").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line)["index"])
            except (json.JSONDecodeError, KeyError):
                pass
    return out


def _launcher(cluster) -> list[str]:
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=30"]


def _jobs(cluster, table: Path) -> dict[str, str]:
    """Job id -> state, for every job the sweep's arrays submitted (from the completion records)."""
    names = {folder.name for folder in (table / "multirun").glob("*/.submitit/*")}
    # a single job ("12"), or the tasks of an array ("6_0", "6_1": the folder "6" holds the array's script)
    ids = sorted(n for n in names if re.fullmatch(r"\d+(_\d+)?", n) and not any(m.startswith(n + "_") for m in names))
    ended = {}
    for record in cluster.completions():
        ended[f"{record.get('JobId')}"] = record.get("JobState")
    return {job: cluster.job_info(job).get("JobState") or ended.get(job, "?") for job in ids}


def test_digits_table_through_slurm_completes_and_marks_a_failed_point(slurm_cluster, tmp_path):
    experiment = tmp_path / "digits_slurm.yaml"
    spec = (REPO / "configs" / "experiment" / "digits.yaml").read_text()
    # One more block whose job fails on purpose: the table must show it failed, not drop it.
    experiment.write_text(spec.replace("blocks:", "blocks:\n  broken: [model.checkpoint=/nonexistent/digits.pt]"))
    table = tmp_path / "table"
    cmd = [sys.executable, "-m", "taylorseer_eval.sweep", str(experiment), "num_samples=30", "batch_size=10",
           f"out_root={table}", *_launcher(slurm_cluster)]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=1500)
    seconds = time.monotonic() - start
    # the table is written, and the sweep exits non-zero naming the point that did not finish
    assert result.returncode == 1, result.stderr[-4000:]
    assert "1 of 10 points did not finish ok" in result.stderr
    jobs = _jobs(slurm_cluster, table)
    print(f"\n[slurm] digits table: {seconds:.0f} s, {len(jobs)} jobs {jobs}")
    assert len(jobs) == 10
    assert "model.checkpoint='/nonexistent/digits.pt' does not exist" in result.stdout + result.stderr
    with open(table / "table.csv") as f:
        rows = {(r["method"], r["N"], r["O"], r["steps"]): r for r in csv.DictReader(f)}
    assert len(rows) == 10
    broken = [r for key, r in rows.items() if key[0] == "broken"]
    assert len(broken) == 1 and broken[0]["status"].startswith("failed")
    assert all(r["status"] == "ok" for key, r in rows.items() if key[0] != "broken")
    taylor = float(rows["TaylorSeer", "4", "1", "50"]["digits.psnr_vs_uncached"])
    assert taylor > float(rows["FORA", "4", "0", "50"]["digits.psnr_vs_uncached"]) + 3


def test_a_preempted_digits_job_resumes_without_lost_or_duplicated_samples(slurm_cluster, tmp_path):
    num = 240
    sweep = Sweep("taylorseer_dit.sample_ddp", ["model=digits", f"num_samples={num}", "batch_size=20",
                                                 "progress=false", *_launcher(slurm_cluster)[1:]],
                  slurm_cluster, out_root=tmp_path)
    run = tmp_path / "dit_fid" / "DiT-Digits-N3-O3-W2-ddim50-cfg1.5-seed0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_indices(run)) < 40:
        time.sleep(0.2)
    (job_id,) = sweep.job_ids()
    before = len(set(_indices(run)))
    assert 40 <= before < num, "the job should be interrupted part-way"
    slurm_cluster.run("scancel", "--signal=USR2", job_id)  # what Slurm sends on preemption or near the limit
    result = sweep.wait(timeout=600)
    print(f"\n[slurm] preempted digits job {job_id}: {before} samples before the signal, "
          f"state {result.jobs[job_id].get('JobState')}, restarts {result.jobs[job_id].get('Restarts')}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.jobs[job_id]["Restarts"] == "1"
    indices = _indices(run)
    assert sorted(indices) == list(range(num))  # every sample once: none lost, none made twice
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == num and metrics["complete"] and (run / f"samples_{num}.npz").is_file()
