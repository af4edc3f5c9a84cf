"""The sweep harness: the paper-table experiments resolve, and the digits table runs end to end, killed and resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taylorseer_eval.sweep import load_experiment, points, run_dirs

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["num_samples=60", "batch_size=20"]  # a CPU-sized digits table


@pytest.mark.parametrize("name,count", [("digits", 9), ("dit_fid50k", 19), ("flux_drawbench", 19),
                                        ("hunyuan_vbench", 7)])
def test_every_paper_table_resolves_to_distinct_run_folders(name, count, tmp_path, monkeypatch):
    for var in ("DRAWBENCH", "VBENCH_PROMPTS"):  # the prompt files name the runs (their text's digest)
        (tmp_path / f"{var}.txt").write_text("a red cat\na blue dog\n")
        monkeypatch.setenv(var, str(tmp_path / f"{var}.txt"))
    exp = load_experiment(name)
    pts = points(exp, [f"out_root={tmp_path}"])
    dirs = run_dirs(exp, pts)  # composes every point through the app's own config: bad keys would fail here
    assert len(pts) == count and len(set(dirs.values())) == count
    assert exp.reference in {p.block for p in pts}


def test_a_bad_experiment_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="no experiment 'nope'.*digits"):
        load_experiment("nope")
    bad = tmp_path / "dup.yaml"
    bad.write_text("app: taylorseer_dit.sample_ddp\ncommon: [model=digits]\n"
                   "blocks: {a: [cache=none], b: [cache=none]}\n")
    with pytest.raises(ValueError, match="write the same run folder"):
        run_dirs(load_experiment(str(bad)), points(load_experiment(str(bad)), [f"out_root={tmp_path}"]))


def _sweep(out_root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "taylorseer_eval.sweep", "digits", *SMALL, f"out_root={out_root}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _records(run: Path) -> list[dict]:
    lines = []
    for f in sorted((run / "records").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # the line a kill tore
    return lines


def test_digits_table_killed_half_way_resumes_and_reports_the_run_folders(tmp_path):
    out = tmp_path / "table"
    proc = _sweep(out)
    deadline = time.time() + 600
    # Kill the whole sweep (driver and its Hydra jobs) once a few runs have samples: half-way through.
    while time.time() < deadline and proc.poll() is None:
        started = [p for p in (out / "dit_fid").glob("*") if _records(p)] if (out / "dit_fid").is_dir() else []
        if len(started) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed: make it longer"
    assert not (out / "table.md").exists()

    resumed = _sweep(out)
    log, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, log[-3000:]
    exp = load_experiment("digits")
    dirs = run_dirs(exp, points(exp, [*SMALL, f"out_root={out}"]))
    for run in dirs.values():  # every sample made exactly once: none lost, none twice
        indices = [r["index"] for r in _records(run)]
        assert sorted(indices) == list(range(60)), run.name

    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    for row in rows:  # the table's numbers are the run folders' numbers
        metrics = json.loads((dirs_by_name(dirs)[row["run"]] / "metrics.json").read_text())
        assert int(row["full_steps"]) == metrics["full_steps"]
        reference = json.loads((dirs_by_name(dirs)[next(r["run"] for r in rows if r["method"] == "nocache")]
                                / "metrics.json").read_text())
        # against the uncached run: the cache's own compression for 50-step runs, 50/K for K-step DDIM
        assert float(row["compression"]) == pytest.approx(reference["flops_total"] / metrics["flops_total"])
        if row["steps"] == "50":
            assert float(row["compression"]) == pytest.approx(metrics["compression"])
        else:
            assert float(row["compression"]) == pytest.approx(50 / int(row["steps"]), rel=0.02)
        if row["method"] != "nocache":
            stored = metrics["eval"]["digits"]["psnr_vs_uncached"]
            assert float(row["digits.psnr_vs_uncached"]) == pytest.approx(stored)

    def psnr(method, **where):
        match = [r for r in rows if r["method"] == method and all(r[k] == str(v) for k, v in where.items())]
        assert len(match) == 1, (method, where)
        return float(match[0]["digits.psnr_vs_uncached"])

    for n, steps in ((4, 14), (5, 11)):  # same computed steps: forecasting beats reuse and fewer steps
        for order in (1, 2):
            taylor = psnr("TaylorSeer", N=n, O=order)
            assert taylor > psnr("FORA", N=n) + 3 and taylor > psnr("fewer steps", steps=steps) + 3
    assert (out / "table.md").read_text().count("| TaylorSeer |") == 4 and (out / "table.png").is_file()

    # A rerun of the finished sweep redoes nothing: every run returns before loading its model.
    again = _sweep(out)
    log, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and log.count("is complete") == 9, log[-2000:]


def dirs_by_name(dirs: dict) -> dict:
    return {path.name: path for path in dirs.values()}


def test_a_failed_point_is_marked_in_the_table_not_dropped(tmp_path):
    from taylorseer_eval.aggregate import rows_of

    exp = load_experiment("digits")
    dirs = run_dirs(exp, points(exp, [*SMALL, f"out_root={tmp_path}"]))
    rows = rows_of(exp, dirs, {str(next(iter(dirs.values()))): "the job ran out of memory"})
    assert len(rows) == 9 and all(r["status"].startswith("failed") for r in rows)
    assert rows[0]["status"] == "failed: the job ran out of memory"
