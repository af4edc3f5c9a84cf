"""The eval command: one-line errors for bad input and unreachable weights, results stored in
metrics.json["eval"] with num_items (a rerun replaces its entry, --tag keeps another), prompt files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taylorseer.harness.runs import read_json, write_metrics
from taylorseer_eval import cli

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import random_images, write_image_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taylorseer_eval.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_a_folder_that_is_not_a_run_fails_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["clip", str(tmp_path / "missing")], ["clip", str(tmp_path / "empty")],
                 ["fidelity", str(tmp_path / "empty")]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("[eval] error:") and "not a run folder" in lines[0]


def test_unreachable_clip_weights_fail_with_one_line_through_the_command(tmp_path):
    run = write_image_run(tmp_path / "run", random_images(2, size=8))
    proc = run_cli("clip", str(run), "--device", "cpu",
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[eval] error:")]
    assert len(errors) == 1 and "laion/CLIP-ViT-g-14-laion2B-s12B-b42K" in errors[0] and "--clip-model" in errors[0]
    assert "eval" not in (read_json(run / "metrics.json") or {})


def test_results_land_in_metrics_json_and_a_rerun_replaces_them(tmp_path, capsys):
    images = random_images(4, size=16, seed=0)
    run = write_image_run(tmp_path / "cached", images, extra_dirs={"uncached": images[::-1].copy()})
    write_image_run(tmp_path / "ref3", images[:3])
    rows = cli.main(["fidelity", str(run), "--lpips", "none", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| run | entry | num_items |" in printed and "fidelity" in printed
    entry = read_json(run / "metrics.json")["eval"]["fidelity"]
    assert entry["num_items"] == 4 and entry["reference"].endswith("uncached") and entry["psnr"] < 100
    assert rows[0]["psnr"] == entry["psnr"] and "computed_at" in entry and "definition" in entry
    # rerun against another reference: the entry is replaced, not merged
    cli.main(["fidelity", str(run), "--reference", str(tmp_path / "ref3"), "--lpips", "none", "--device", "cpu"])
    entry = read_json(run / "metrics.json")["eval"]["fidelity"]
    assert entry["num_items"] == 3 and entry["num_unmatched"] == 1 and entry["psnr"] == 100.0
    assert sorted(entry["per_item"]) == ["0", "1", "2"]
    # --tag keeps both
    cli.main(["fidelity", str(run), "--lpips", "none", "--device", "cpu", "--tag", "self"])
    evals = read_json(run / "metrics.json")["eval"]
    assert set(evals) == {"fidelity", "fidelity@self"} and evals["fidelity@self"]["num_items"] == 4
    # the sampling app rewriting metrics.json keeps the eval section
    write_metrics(run, {"items": read_json(run / "metrics.json")["items"], "num_items": 4})
    assert set(read_json(run / "metrics.json")["eval"]) == {"fidelity", "fidelity@self"}


def test_drawbench_prompt_file_from_a_csv(tmp_path, capsys):
    source = tmp_path / "drawbench.csv"
    with open(source, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Prompts", "Category"])
        writer.writerows([[f"prompt number {i}\nwith a break", "Colors"] for i in range(200)])
    cli.main(["prompts", "drawbench", "--source", str(source), "-o", str(tmp_path / "drawbench.txt")])
    lines = (tmp_path / "drawbench.txt").read_text().splitlines()
    assert len(lines) == 200 and lines[7] == "prompt number 7 with a break"
    assert "wrote 200 prompts" in capsys.readouterr().out
    with open(tmp_path / "short.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["prompts"], ["one"], ["two"]])
    with pytest.raises(ValueError, match="holds 2 prompts, DrawBench has 200"):
        cli.main(["prompts", "drawbench", "--source", str(tmp_path / "short.csv"), "-o", str(tmp_path / "x.txt")])
    with pytest.raises(ValueError, match="needs --source"):
        cli.main(["prompts", "drawbench", "-o", str(tmp_path / "x.txt")])


def test_prompt_coverage_is_recorded_beside_a_prompt_metric(tmp_path):
    from taylorseer_eval.prompts import prompt_coverage

    (tmp_path / "bench.txt").write_text("a\nb\nc\n")
    out = prompt_coverage(["a", "c", "z"], tmp_path / "bench.txt")
    assert (out["prompts_expected"], out["prompts_missing"], out["complete"], out["extra_prompts"]) == (3, 1, False, 1)
    assert json.dumps(out)  # stored in metrics.json as it is
