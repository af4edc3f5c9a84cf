"""FID: the formula on Gaussians of known moments, the pytorch-fid code path on a tiny feature network,
the reference-statistics cache, and the real network's loader failing with one line offline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer_eval import fid
from taylorseer_eval.media import NpzImages

sys.path.insert(0, str(Path(__file__).parent))
from eval_runs import TinyPoolNet, random_images, write_image_run, write_npz_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def exact_moments(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly ``mu`` and sample covariance exactly ``cov`` (np.cov, ddof=1)."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: covariance I
    return z @ np.linalg.cholesky(cov).T + mu


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) as the sum of square roots of the eigenvalues of S1 S2 (no matrix square root)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum())


def test_frechet_distance_of_gaussians_with_known_moments():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = exact_moments(400, mu1, np.diag(var1), seed=0)
    b = exact_moments(300, mu2, np.diag(var2), seed=1)
    # diagonal covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(v1) - sqrt(v2))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert expected == pytest.approx(5.25 + (4 + 1 + 0 + 0.5), rel=1e-12)  # (1-3)^2, (2-1)^2, 0, (1.414-0.707)^2
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # a full (non-diagonal) covariance against the eigenvalue route
    cov = np.array([[2.0, 0.6, 0.0, 0.1], [0.6, 1.0, 0.3, 0.0], [0.0, 0.3, 1.5, -0.4], [0.1, 0.0, -0.4, 0.8]])
    c = exact_moments(500, mu1, cov, seed=2)
    assert fid.frechet_distance(c, b) == pytest.approx(independent_fid(c, b), rel=1e-8)


def test_statistics_rejects_too_few_features():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.statistics(np.zeros((1, 4)))


def test_fid_of_a_dit_npz_run_against_an_image_reference(tmp_path):
    """The whole command path on a tiny network: the run's .npz (read in batches from the zip) and the
    reference's arr_0 go through the same feature function; the number equals an independent one."""
    gen, real = random_images(37, seed=1, low=0, high=200), random_images(41, seed=2, low=40, high=256)
    run = write_npz_run(tmp_path / "runs" / "dit_fid" / "r", gen)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=real)
    net = TinyPoolNet()
    result = fid.compute_fid(run, ref, batch_size=8, device="cpu", model=net, feature_id="tiny")

    def feats(images):
        with torch.no_grad():
            return net.features(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).double().numpy()

    expected = independent_fid(feats(gen), feats(real))
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["num_items"] == 37 and result["reference_num_items"] == 41
    assert "arr_0" in result["source"] and result["reference_kind"].startswith("statistics of the images")


def test_reference_statistics_are_cached_beside_the_reference_and_keyed_by_its_bytes(tmp_path):
    gen = random_images(20, seed=3)
    run = write_image_run(tmp_path / "run", gen)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=random_images(30, seed=4))
    net = TinyPoolNet()
    first = fid.compute_fid(run, ref, batch_size=7, device="cpu", model=net, feature_id="tiny")
    assert net.seen == 50  # 30 reference + 20 run images
    cache = Path(first["reference_cache"])
    assert cache.parent == tmp_path and cache.name.startswith("ref.npz.fid-tiny.") and cache.is_file()
    second = fid.compute_fid(run, ref, batch_size=7, device="cpu", model=net, feature_id="tiny")
    assert net.seen == 70  # only the run's 20 images: the reference came from the cache
    assert second["fid"] == first["fid"]
    # another network id or changed reference bytes are never mistaken for the cached statistics
    fid.compute_fid(run, ref, batch_size=7, device="cpu", model=net, feature_id="tiny-b")
    assert net.seen == 120
    np.savez(ref, arr_0=random_images(30, seed=5))
    third = fid.compute_fid(run, ref, batch_size=7, device="cpu", model=net, feature_id="tiny")
    assert net.seen == 170 and third["fid"] != first["fid"]
    assert Path(third["reference_cache"]) != cache
    # precomputed statistics (mu, sigma) stand for the images they came from
    with np.load(third["reference_cache"]) as stats:
        np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    from_stats = fid.compute_fid(run, tmp_path / "stats.npz", device="cpu", model=net, feature_id="tiny")
    assert from_stats["fid"] == pytest.approx(third["fid"], rel=1e-12)
    assert from_stats["reference_kind"].startswith("statistics (mu, sigma)")
    with pytest.raises(ValueError, match="no mu/sigma"):
        fid.compute_fid(run, ref, device="cpu", model=net, feature_id="tiny", ref_use="statistics")


def test_npz_reader_streams_batches_in_order(tmp_path):
    images = random_images(10, size=5, seed=6)
    np.savez(tmp_path / "a.npz", arr_0=images)
    reader = NpzImages(tmp_path / "a.npz")
    assert len(reader) == 10
    np.testing.assert_array_equal(np.concatenate(list(reader.batches(3))), images)
    np.savez(tmp_path / "b.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        NpzImages(tmp_path / "b.npz")


def test_real_inception_loader_fails_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError) as err:
        fid.load_inception(2048)
    message = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and str(tmp_path / "torch") in message
    assert "\n" not in message
