"""The metrics that run in their own environments (ImageReward, VBench): the JSON runner protocol driven
with the core interpreter (where the packages are absent), stand-in packages with the real packages'
interfaces, their failure messages, and the real environments when they are built here."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer_eval import external
from taylorseer_eval.imagereward import compute_imagereward
from taylorseer_eval.rundir import open_run
from taylorseer_eval.vbench_eval import DIMENSIONS, compute_vbench, total_score

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import random_images, write_image_run, write_video_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORE = sys.executable

FAKE_IMAGEREWARD = '''
"""Stand-in with image-reward's interface: load(name, device, download_root, med_config) -> .score(prompt, path)."""
import os
import numpy as np
from PIL import Image

class _Model:
    def score(self, prompt, image):
        pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float64)
        return float(pixels.mean() / 255.0 + len(prompt) / 100.0)

def load(name="ImageReward-v1.0", device="cpu", download_root=None, med_config=None):
    if os.environ.get("FAKE_IR_DOWNLOAD"):
        # what the real load() does first: fetch the checkpoint from the hub
        from huggingface_hub import hf_hub_download
        hf_hub_download(repo_id="THUDM/ImageReward", filename="ImageReward.pt", local_dir=download_root)
    if os.environ.get("FAKE_IR_CRASH"):
        raise ZeroDivisionError("a bug inside the package")
    return _Model()
'''


def fake_package(root: Path, name: str, source: str, version: str | None = None, dist: str | None = None) -> Path:
    """Module ``name`` under ``root``, installed as distribution ``dist`` (default ``name``) ``version``."""
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "__init__.py").write_text(textwrap.dedent(source))
    if version:
        dist = dist or name
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return root


@pytest.fixture
def image_run(tmp_path):
    return open_run(write_image_run(tmp_path / "run", random_images(3, size=8, seed=0)))


def test_runner_in_an_environment_without_the_package_fails_with_the_setup_command(image_run):
    with pytest.raises(external.RunnerFailed) as err:
        compute_imagereward(image_run, python=CORE)
    message = str(err.value)
    assert "image-reward package cannot be imported" in message
    assert "bash scripts/setup_eval_envs.sh imagereward" in message and "\n" not in message
    with pytest.raises(external.RunnerFailed, match="setup_eval_envs.sh vbench"):
        external.call_runner("vbench", {"videos": []}, python=CORE)


def test_missing_environment_names_the_build_command(image_run, monkeypatch, tmp_path):
    monkeypatch.setenv("EVAL_ENV_ROOT", str(tmp_path))
    monkeypatch.delenv("TAYLORSEER_IMAGEREWARD_PYTHON", raising=False)
    with pytest.raises(FileNotFoundError, match=r"setup_eval_envs.sh imagereward` \(about a minute"):
        compute_imagereward(image_run)


def test_imagereward_scores_come_back_through_the_protocol(image_run, tmp_path, monkeypatch):
    fake = fake_package(tmp_path / "site", "ImageReward", FAKE_IMAGEREWARD, "1.5", "image-reward")
    monkeypatch.setenv("PYTHONPATH", f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = compute_imagereward(image_run, python=CORE, device="cpu")
    from PIL import Image

    expected = [np.asarray(Image.open(i.path).convert("RGB"), dtype=np.float64).mean() / 255 + len(i.prompt) / 100
                for i in image_run.items]
    assert [result["per_item"][i.key] for i in image_run.items] == pytest.approx(expected, rel=1e-12)
    assert result["imagereward"] == pytest.approx(np.mean(expected), rel=1e-12)
    assert result["num_items"] == 3 and result["package"] == "image-reward 1.5"


def test_imagereward_weights_that_cannot_be_fetched_fail_with_one_message(image_run, tmp_path, monkeypatch):
    fake = fake_package(tmp_path / "site", "ImageReward", FAKE_IMAGEREWARD, "1.5", "image-reward")
    monkeypatch.setenv("PYTHONPATH", f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env = {"FAKE_IR_DOWNLOAD": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with pytest.raises(WeightsNotFoundError) as err:
        compute_imagereward(image_run, model_dir=None, python=CORE, env=env)
    message = str(err.value)
    assert "THUDM/ImageReward" in message and "ImageReward.pt" in message and "bert-base-uncased" in message
    assert "--model-dir" in message and "\n" not in message
    # a local folder without the two files is named as such
    with pytest.raises(WeightsNotFoundError, match="missing ImageReward.pt, med_config.json"):
        compute_imagereward(image_run, model_dir=str(tmp_path), python=CORE)


def test_a_crash_in_the_runner_prints_its_traceback_and_fails_with_one_line(image_run, tmp_path, monkeypatch, capfd):
    fake = fake_package(tmp_path / "site", "ImageReward", FAKE_IMAGEREWARD, "1.5", "image-reward")
    monkeypatch.setenv("PYTHONPATH", f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # the package's own exception inside load() is "weights could not be loaded"; a crash after it is a bug
    item = image_run.items[0]
    request = {"items": [{"key": item.key, "prompt": "x", "file": str(item.path)}], "device": "cpu"}
    with pytest.raises(external.RunnerFailed, match="ZeroDivisionError: a bug") as err:
        external.call_runner("imagereward", request, python=CORE, env={"FAKE_IR_CRASH": "1"})
    assert "\n" not in str(err.value)
    # an interpreter that dies without answering
    dead = tmp_path / "dead-python"
    dead.write_text("#!/bin/sh\nexit 3\n")
    dead.chmod(0o755)
    with pytest.raises(external.RunnerFailed, match="exited with status 3 without a result"):
        external.call_runner("imagereward", request, python=str(dead))


FAKE_VBENCH = '''
"""Stand-in with vbench's interface: VBench(device, full_info_dir, output_path).evaluate(...) writes
<output>/<name>_eval_results.json as {dimension: [score, per-video results]}; the score here is the
fraction of the videos the full info asks for that exist under VBench's lookup name."""
import json, os

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.full_info, self.out = full_info_dir, output_path
        os.makedirs(output_path, exist_ok=True)

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        assert local and mode == "vbench_standard"
        names = os.listdir(videos_path)
        suffix = os.path.splitext(names[0])[1]  # as VBench does: the first file's suffix
        results = {}
        for dim in dimension_list:
            wanted = [f"{e['prompt_en']}-{i}{suffix}" for e in json.load(open(self.full_info))
                      if dim in e["dimension"] for i in range(5)]
            found = [w for w in wanted if w in names]
            results[dim] = [len(found) / len(wanted), [{"video_path": f} for f in found]]
        json.dump(results, open(os.path.join(self.out, name + "_eval_results.json"), "w"))
'''


def test_vbench_runner_links_videos_by_prompt_and_index_and_totals_all_16(tmp_path, monkeypatch):
    from taylorseer_eval.runners.run_vbench import WEIGHTS

    prompts = ["a cat", "a dog", "a red car"]
    run = open_run(write_video_run(tmp_path / "run", prompts, per_prompt=5, frames=2, size=16), "video")
    full_info = tmp_path / "full_info.json"
    # "a cat" and "a dog" serve every dimension, "a red car" also serves color, "a bird" (never sampled) scene
    entries = [{"prompt_en": p, "dimension": list(DIMENSIONS)} for p in ("a cat", "a dog")]
    entries += [{"prompt_en": "a red car", "dimension": ["color"]}, {"prompt_en": "a bird", "dimension": ["scene"]}]
    full_info.write_text(json.dumps(entries))
    site = fake_package(tmp_path / "site", "vbench", FAKE_VBENCH, "0.1.5")
    fake_package(site, "detectron2", "")
    cache = tmp_path / "vbench_cache"
    for files in WEIGHTS.values():
        for rel, _url in files:
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            (cache / rel).touch()
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = compute_vbench(run, None, "cpu", str(cache), CORE, str(full_info))
    scores = result["dimensions"]
    assert scores["color"] == 1.0 and scores["scene"] == pytest.approx(10 / 15)  # "a bird" has no videos
    assert all(scores[d] == 1.0 for d in DIMENSIONS if d not in ("scene",))
    assert result["num_videos"]["scene"] == 10 and result["expected_videos"]["scene"] == 15
    assert result["total_score"] == pytest.approx(total_score(scores)["total_score"])
    assert result["num_items"] == 15 and result["package"] == "vbench 0.1.5"
    # a model file that is not there: one message naming it, nothing evaluated
    (cache / "amt_model" / "amt-s.pth").unlink()
    with pytest.raises(WeightsNotFoundError) as err:
        compute_vbench(run, ["motion_smoothness", "temporal_flickering"], "cpu", str(cache), CORE, str(full_info))
    assert "amt-s.pth" in str(err.value) and "lalala125/AMT" in str(err.value) and "\n" not in str(err.value)


VBENCH_ENV = ROOT / ".venv-vbench" / "bin" / "python"
IMAGEREWARD_ENV = ROOT / ".venv-imagereward" / "bin" / "python"


@pytest.mark.skipif(not VBENCH_ENV.is_file(), reason="needs `bash scripts/setup_eval_envs.sh vbench`")
def test_real_vbench_temporal_flickering_equals_the_frame_differences(tmp_path):
    """The real package (no model needed for this dimension) on two tiny videos of a VBench prompt."""
    from taylorseer_eval.media import load_video

    prompt = "In a still frame, a stop sign"  # a temporal_flickering prompt of VBench_full_info.json
    run = open_run(write_video_run(tmp_path / "run", [prompt], per_prompt=2, frames=8, size=32), "video")
    result = compute_vbench(run, ["temporal_flickering"], "cpu", str(tmp_path / "cache"), str(VBENCH_ENV))
    per_video = []
    for item in run.items:
        frames = load_video(item.path).astype(np.float32)
        per_video.append((255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0)
    assert result["dimensions"]["temporal_flickering"] == pytest.approx(np.mean(per_video), abs=2e-3)
    assert result["num_videos"]["temporal_flickering"] == 2 and result["total_score"] is None


@pytest.mark.skipif(not IMAGEREWARD_ENV.is_file(), reason="needs `bash scripts/setup_eval_envs.sh imagereward`")
def test_real_imagereward_loader_fails_clearly_offline(image_run, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    with pytest.raises(WeightsNotFoundError, match="THUDM/ImageReward"):
        compute_imagereward(image_run, python=str(IMAGEREWARD_ENV), env=env)
