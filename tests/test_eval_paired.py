"""PSNR/SSIM/LPIPS against the uncached outputs of the same seeds: a known noise level, LPIPS by hand on
the lpips package's own network (random backbone, shipped linear heads), matching by index and seed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer_eval import perceptual
from taylorseer_eval.paired import compute_paired
from taylorseer_eval.rundir import open_run

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import random_images, write_image_run, write_mp4  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def checkerboard_noise(images: np.ndarray, step: int) -> np.ndarray:
    """+step / -step on alternating pixels: MSE = (step/255)^2 exactly (no clipping for values in 8..247)."""
    sign = np.where((np.arange(images.shape[1])[:, None] + np.arange(images.shape[2])) % 2, 1, -1)
    return (images.astype(int) + step * sign[None, :, :, None]).astype(np.uint8)


@pytest.fixture(scope="module")
def random_lpips():
    import lpips

    torch.manual_seed(0)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def lpips_by_hand(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """LPIPS written out: scale to [-1, 1], the package's input shift/scale, unit-normalise each stage's
    channels, square the difference, weight by the 1x1 linear heads, average over space, sum stages."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = model.net((2 * x - 1 - shift) / scale), model.net((2 * y - 1 - shift) / scale)
    total = 0.0
    for layer, (a, b) in enumerate(zip(fx, fy, strict=True)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weight = model.lins[layer].model[-1].weight.view(1, -1, 1, 1)
        total += float(((a - b) ** 2 * weight).sum(1).mean())
    return total


def test_psnr_of_a_known_noise_level_ssim_and_lpips_by_hand(tmp_path, random_lpips):
    reference = random_images(3, size=64, seed=0, low=8, high=248)
    cached = checkerboard_noise(reference, 4)
    run = open_run(write_image_run(tmp_path / "run", cached, extra_dirs={"uncached": reference}))
    result = compute_paired(run, None, device="cpu", lpips_model=random_lpips)
    assert result["psnr"] == pytest.approx(20 * np.log10(255 / 4), abs=1e-9)  # 36.09 dB
    assert result["num_items"] == 3 and result["num_unmatched"] == 0
    assert result["reference"] == str(tmp_path / "run" / "uncached")
    assert 0 < result["ssim"] < 1
    with torch.no_grad():
        expected = [lpips_by_hand(random_lpips, torch.from_numpy(c).permute(2, 0, 1)[None].float() / 255,
                                  torch.from_numpy(r).permute(2, 0, 1)[None].float() / 255)
                    for c, r in zip(cached, reference, strict=True)]
    assert [result["per_item"][str(i)]["lpips"] for i in range(3)] == pytest.approx(expected, rel=1e-4)
    # identical outputs: 100 dB (finite), SSIM 1, LPIPS 0
    same = compute_paired(open_run(write_image_run(tmp_path / "same", reference)), tmp_path / "same",
                          device="cpu", lpips_model=random_lpips)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0) and same["lpips"] == pytest.approx(0, abs=1e-7)


def test_reference_run_is_matched_by_index_and_seed(tmp_path):
    images = random_images(4, size=16, seed=1)
    run = open_run(write_image_run(tmp_path / "cached", images, seed=10))
    # a reference with only 3 of the 4 items: the 4th is counted as unmatched, not silently dropped
    write_image_run(tmp_path / "uncached3", images[:3], seed=10)
    result = compute_paired(run, tmp_path / "uncached3", lpips_net=None, device="cpu")
    assert result["num_items"] == 3 and result["num_unmatched"] == 1 and "lpips" not in result
    write_image_run(tmp_path / "other_seeds", images, seed=99)
    with pytest.raises(ValueError, match="seed 10 here but 99 in the reference"):
        compute_paired(run, tmp_path / "other_seeds", lpips_net=None, device="cpu")
    with pytest.raises(ValueError, match="no uncached/ folder"):
        compute_paired(run, None, lpips_net=None, device="cpu")


def test_videos_are_compared_frame_by_frame(tmp_path):
    folder = tmp_path / "video_run"
    folder.mkdir()
    frames = random_images(5, size=32, seed=2)
    items = []
    for prompt in ("a dog", "a cat"):
        for index in range(2):
            name = f"{prompt}-{index}.mp4"
            write_mp4(folder / name, frames)
            items.append({"prompt": prompt, "index": index, "seed": 42 + index, "file": name})
    (folder / "metrics.json").write_text(json.dumps({"items": items}))
    shutil.copytree(folder, tmp_path / "reference")
    result = compute_paired(open_run(folder, "video"), tmp_path / "reference", lpips_net=None, device="cpu")
    # indices repeat per prompt: items are keyed by file and matched by (prompt, index)
    assert sorted(result["per_item"]) == ["a cat-0.mp4", "a cat-1.mp4", "a dog-0.mp4", "a dog-1.mp4"]
    assert result["psnr"] == 100.0 and result["ssim"] == pytest.approx(1.0)


def test_real_lpips_loader_fails_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError) as err:
        perceptual.load_lpips("alex")
    assert "alexnet-owt-7be5be79.pth" in str(err.value) and "--lpips none" in str(err.value)
    assert "\n" not in str(err.value)
