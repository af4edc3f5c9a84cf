"""IS, KID and precision/recall (torch-fidelity's functions) on features with known answers, the command
path on a tiny feature network, and the real network's loader failing with one line offline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer_eval import inception_metrics as im

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import random_images, write_image_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes, n = 5, 100
    logits = 60.0 * np.eye(classes)[np.arange(n) % classes]  # each split of 10 holds every class twice
    out = im.inception_score(logits)
    assert out["is"] == pytest.approx(classes, rel=1e-9) and out["is_std"] == pytest.approx(0, abs=1e-9)
    # one class for everything: no information, IS = 1
    assert im.inception_score(60.0 * np.eye(classes)[np.zeros(n, dtype=int)])["is"] == pytest.approx(1.0, rel=1e-9)
    # sample order is kept (ADM's splits): sorted classes make each split single-class, IS = 1
    assert im.inception_score(60.0 * np.eye(classes)[np.sort(np.arange(n) % classes)])["is"] == pytest.approx(1.0)


def unbiased_mmd2_poly(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out (Binkowski et al. 2018, eq. 3)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def test_kid_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(loc=0.3, size=(60, 8))
    # one subset of all samples is a permutation, to which the unbiased estimator is invariant
    out = im.kid(x, y, subsets=1, subset_size=60)
    assert out["kid"] == pytest.approx(unbiased_mmd2_poly(x, y), rel=1e-9)
    assert out["kid_subset_size"] == 60
    assert im.kid(x, y, subsets=3, subset_size=1000)["kid_subset_size"] == 60  # capped at the sample count


def test_precision_recall_of_half_covered_manifolds():
    rng = np.random.default_rng(1)
    a = rng.normal(scale=0.1, size=(20, 4))            # real cluster A
    b = rng.normal(scale=0.1, size=(20, 4)) + 50.0      # real cluster B
    c = rng.normal(scale=0.1, size=(20, 4)) - 50.0      # generated far away
    real, generated = np.concatenate([a, b]), np.concatenate([a, c])
    out = im.precision_recall(generated, real)
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5) and out["pr_k"] == 3


class TinyFidelityNet(torch.nn.Module):
    """torch-fidelity's extractor convention: uint8 NCHW -> (pool (N, 6), logits (N, 4))."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 6, generator=gen)
        self.fc = torch.randn(6, 4, generator=gen)

    def forward(self, x):
        pool = torch.tanh((x.float() / 255).mean(dim=(2, 3)) @ self.w)
        return pool, 20 * pool @ self.fc


def test_command_path_on_a_tiny_network_matches_the_formulas(tmp_path):
    colours = np.random.default_rng(3).integers(0, 256, (24, 1, 1, 3), dtype=np.uint8)  # diverse predictions
    gen, real = (random_images(24, seed=1, high=40) + colours).astype(np.uint8), random_images(30, seed=2, low=60)
    run = write_image_run(tmp_path / "run", gen)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real)
    net = TinyFidelityNet()
    out = im.compute_inception_metrics(run, ref, ("is", "kid", "pr"), batch_size=5, device="cpu", model=net,
                                       feature_id="tiny")
    with torch.no_grad():
        pool, logits = net(torch.from_numpy(gen).permute(0, 3, 1, 2))
        ref_pool, _ = net(torch.from_numpy(real).permute(0, 3, 1, 2))
    p = torch.softmax(logits.double(), 1).numpy()
    splits = [np.arange(i * 24 // 10, (i + 1) * 24 // 10) for i in range(10)]  # contiguous, floor boundaries
    by_hand = [np.exp((p[s] * (np.log(p[s]) - np.log(p[s].mean(0)))).sum(1).mean()) for s in splits]
    assert out["is"]["is"] == pytest.approx(np.mean(by_hand), rel=1e-5) and out["is"]["is"] > 1.2
    assert out["kid"]["kid_subset_size"] == 24 and out["kid"]["num_items"] == 24
    assert out["kid"]["reference_num_items"] == 30 and Path(out["kid"]["reference_cache"]).is_file()
    assert 0 <= out["pr"]["precision"] <= 1 and 0 <= out["pr"]["recall"] <= 1
    with pytest.raises(ValueError, match="pass --ref"):
        im.compute_inception_metrics(run, None, ("kid",), model=net, feature_id="tiny")


def test_real_torch_fidelity_loader_fails_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError) as err:
        im.load_extractor(torch.device("cpu"))
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value) and "\n" not in str(err.value)
