"""FLUX and HunyuanVideo data-parallel on 2 gloo processes (taylorseer.harness.launch = torchrun's machinery): the
same outputs as one process, every output made exactly once, and a run killed half-way completes on rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_flux import IMAGE_SIZE, TEXT_TOKENS, save_tiny_flux  # noqa: E402
from tiny_hunyuan import save_tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PROMPTS = ["a photo of the cat", "a dog on a skateboard", "the cat sleeps", "a red cat", "cat and dog"]


def _cmd(module: str, nproc: int, *overrides: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *overrides]
    return [sys.executable, "-m", "taylorseer.harness.launch", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *overrides]


def _records(run: Path, key: str) -> list:
    out = []
    for f in sorted((run / "records").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError):
                pass
    return out


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _files(run: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.glob(pattern))}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


def test_flux_on_two_ranks_equals_one_and_resumes_after_a_kill(flux_dir, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    base = [f"model.path={flux_dir}", f"out_root={tmp_path}", f"height={IMAGE_SIZE}", f"width={IMAGE_SIZE}",
            f"max_sequence_length={TEXT_TOKENS}", "num_steps=12", f"prompt_file={tmp_path / 'p.txt'}",
            "warmup=false", "progress=false", "device=cpu"]
    subprocess.run(_cmd("taylorseer_flux.sample", 1, *base, "run_name=one"), check=True, env=ENV, timeout=600,
                   capture_output=True)
    two = subprocess.run(_cmd("taylorseer_flux.sample", 2, *base, "run_name=two"), env=ENV, timeout=600,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one_dir, two_dir = tmp_path / "flux" / "one", tmp_path / "flux" / "two"
    assert _files(two_dir, "*.png") == _files(one_dir, "*.png") and len(_files(one_dir, "*.png")) == 5
    assert sorted(_records(two_dir, "index")) == [0, 1, 2, 3, 4]  # each image once, over both ranks
    assert {r for r in _records(two_dir, "rank")} == {0, 1}
    metrics = json.loads((two_dir / "metrics.json").read_text())
    assert metrics["num_items"] == 5 and metrics["complete"] and metrics["world_size"] == 2

    killed = tmp_path / "flux" / "killed"
    proc = subprocess.Popen(_cmd("taylorseer_flux.sample", 2, *base, "run_name=killed"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(proc, lambda: len(list(killed.glob("*.png"))) >= 2)
    assert len(list(killed.glob("*.png"))) < 5
    subprocess.run(_cmd("taylorseer_flux.sample", 2, *base, "run_name=killed"), check=True, env=ENV, timeout=600,
                   capture_output=True)
    assert _files(killed, "*.png") == _files(one_dir, "*.png")
    indices = _records(killed, "index")
    assert sorted(set(indices)) == [0, 1, 2, 3, 4] and len(indices) <= 5 + 1  # at most the one a kill interrupted
    assert json.loads((killed / "metrics.json").read_text())["num_items"] == 5


def test_hunyuan_video_on_two_ranks_equals_one_and_resumes_after_a_kill(tmp_path):
    hv_dir = save_tiny_pipeline(tmp_path / "hv")
    base = [f"model.path={hv_dir}", f"out_root={tmp_path}", "height=32", "width=32", "num_frames=5",
            "max_sequence_length=8", "num_steps=6", "videos_per_prompt=2", "prompt=[a cat walks,a dog runs]",
            "warmup=false", "progress=false", "device=cpu"]
    subprocess.run(_cmd("taylorseer_hunyuan_video.sample", 1, *base, "run_name=one"), check=True, env=ENV,
                   timeout=600, capture_output=True)
    two = subprocess.run(_cmd("taylorseer_hunyuan_video.sample", 2, *base, "run_name=two"), env=ENV, timeout=600,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one_dir, two_dir = tmp_path / "hunyuan_video" / "one", tmp_path / "hunyuan_video" / "two"
    assert _files(two_dir, "*.mp4") == _files(one_dir, "*.mp4") and len(_files(one_dir, "*.mp4")) == 4
    assert sorted(_records(two_dir, "file")) == sorted(_files(one_dir, "*.mp4"))
    assert json.loads((two_dir / "metrics.json").read_text())["num_items"] == 4

    killed = tmp_path / "hunyuan_video" / "killed"
    proc = subprocess.Popen(_cmd("taylorseer_hunyuan_video.sample", 2, *base, "run_name=killed"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(proc, lambda: len(list(killed.glob("*.mp4"))) >= 1)
    subprocess.run(_cmd("taylorseer_hunyuan_video.sample", 2, *base, "run_name=killed"), check=True, env=ENV,
                   timeout=600, capture_output=True)
    assert _files(killed, "*.mp4") == _files(one_dir, "*.mp4")
    files = _records(killed, "file")
    assert sorted(set(files)) == sorted(_files(one_dir, "*.mp4")) and len(files) <= 4 + 1
