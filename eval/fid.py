"""Frechet distance between two feature sets (the FID formula, Heusel et al. 2017, eq. 6).

The arithmetic is pytorch-fid's ``calculate_frechet_distance``; what differs per domain is the
feature network: Inception-v3 pool features for ImageNet/DrawBench images (pytorch-fid downloads
its weights on first use), the bundled digits classifier's penultimate features for the toy model.
"""

from __future__ import annotations

import numpy as np
import torch


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features for FID statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FID between feature sets ``a`` and ``b`` (rows are samples)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, s1 = statistics(a)
    mu2, s2 = statistics(b)
    # identical sets give a tiny negative number from the matrix square root's rounding
    return max(float(calculate_frechet_distance(mu1, s1, mu2, s2)), 0.0)
