"""FLOPs of a DiT sampling run: of a loaded model, or of a full-size DiT on the ``meta`` device (no weights).

Counted with the core's ``count_schedule`` (torch's FlopCounterMode, 2 FLOPs per multiply-add): one computed
and one forecast call with the cache attached, extrapolated to the schedule.
"""

from __future__ import annotations

import torch

import taylorseer
from taylorseer import CacheConfig, FlopsReport

from .cache import attach_cache
from .models import DiT
from .pipeline import build_model


def count_flops(model: DiT, config: CacheConfig, num_steps: int, cfg_scale: float) -> FlopsReport:
    """FLOPs of one image's sampling run (batch of 1; doubled by CFG as the real run is)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = 2 if cfg_scale > 1.0 else 1
    x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device, dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    cache = taylorseer.get_cache(model)
    with torch.no_grad():
        return taylorseer.count_schedule(lambda: model(x, t, y), cache if config.enabled else None, num_steps)


def count_run_flops(config: CacheConfig, model: str = "DiT-XL/2", image_size: int = 256, num_steps: int = 50,
                    cfg_scale: float = 1.5) -> FlopsReport:
    """FLOPs of one image's sampling run for a full-size DiT, counted on the meta device (no weights)."""
    with torch.device("meta"):
        dit = build_model(model, image_size)
    attach_cache(dit, config, num_steps)
    try:
        return count_flops(dit, config, num_steps, cfg_scale)
    finally:
        taylorseer.remove(dit)
