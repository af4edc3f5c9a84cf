"""Fidelity of cached outputs against the uncached outputs of the same seeds: PSNR and SSIM.

Images are float tensors in [0, 1], shaped (N, C, H, W) (video frames: flatten time into N).
LPIPS lives in :mod:`taylorseer_eval.perceptual` because it needs downloaded weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-item PSNR in dB, (N,). Identical items give +inf."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-item SSIM (Wang et al. 2004) with a Gaussian window, averaged over channels, (N,)."""
    x, ref = x.double(), ref.double()
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    C = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(ref * ref) - mu_y**2
    cov = blur(x * ref) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def finite_mean(values: torch.Tensor, cap: float = 100.0) -> float:
    """Mean PSNR with identical items counted as ``cap`` dB, so a table never shows inf."""
    return float(values.clamp(max=cap).mean())
