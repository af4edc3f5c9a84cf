"""PSNR, SSIM and LPIPS of a cached run against the uncached outputs of the same items (index and seed).

ImageReward and CLIP score judge an image alone and are blind to blur; these three measure how far the
cache moved each output from what the model really generates. Images count as one frame, videos as
their frames: an item's value is the mean over its frames, the run's value the mean over items.
PSNR uses the mean squared error over all pixels and channels in [0, 1] (identical outputs count as
100 dB, so the mean stays finite); SSIM is Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5)
averaged over channels (``fidelity.py``).

    bash scripts/eval.sh fidelity runs/flux/<cached run> --reference runs/flux/<uncached run>
    bash scripts/eval.sh fidelity runs/flux/<run with compare_uncached=true>      # its uncached/ folder
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .fidelity import psnr, ssim
from .media import load_frames
from .perceptual import load_lpips, lpips_distance
from .rundir import RunFolder, pair_items, reference_items
from .sources import resolve_device

PSNR_CAP = 100.0
DEFINITION = {
    "psnr": "10 log10(1 / MSE) over pixels in [0, 1], mean over frames and items, identical = 100 dB",
    "ssim": "Wang et al. 2004, 11x11 Gaussian window sigma 1.5, mean over channels, frames and items",
    "lpips": "lpips {version} v0.1 linear heads on torchvision {net} features, mean over frames and items",
}


def to_float(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, H, W) floats in [0, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255.0


def compute_paired(run: RunFolder, reference=None, lpips_net: str | None = "alex", device: str = "auto",
                   lpips_model: torch.nn.Module | None = None, frames_per_batch: int = 16) -> dict:
    """PSNR/SSIM (and LPIPS unless ``lpips_net`` is None) of every output of ``run`` against its twin."""
    ref_path, ref_items = reference_items(run, reference)
    pairs, unmatched = pair_items(run.items, ref_items)
    dev = resolve_device(device)
    if lpips_model is None and lpips_net:
        lpips_model = load_lpips(lpips_net, dev)
    per_item = {}
    for item, twin in tqdm(pairs, desc="PSNR/SSIM/LPIPS", unit="item", leave=False):
        x, ref = load_frames(item.path), load_frames(twin.path)
        if x.shape != ref.shape:
            raise ValueError(f"item {item.key}: {item.path.name} is {x.shape} but its reference {twin.path} is "
                             f"{ref.shape}; the reference must have the same size and frame count")
        x, ref = to_float(x), to_float(ref)
        record = {"psnr": float(psnr(x, ref).clamp(max=PSNR_CAP).mean()), "ssim": float(ssim(x, ref).mean())}
        if lpips_model is not None:
            values = [lpips_distance(lpips_model, x[s:s + frames_per_batch].float().to(dev),
                                     ref[s:s + frames_per_batch].float().to(dev)).double().cpu()
                      for s in range(0, len(x), frames_per_batch)]
            record["lpips"] = float(torch.cat(values).mean())
        per_item[item.key] = record
    out = {metric: float(np.mean([r[metric] for r in per_item.values()])) for metric in next(iter(per_item.values()))}
    import lpips as lpips_package

    version = getattr(lpips_package, "__version__", "0.1.4")
    definition = {k: v.format(version=version, net=lpips_net) for k, v in DEFINITION.items() if k in out}
    return {**out, "num_items": len(per_item), "num_unmatched": len(unmatched), "reference": str(ref_path),
            "lpips_net": lpips_net if "lpips" in out else None, "definition": definition, "per_item": per_item}
