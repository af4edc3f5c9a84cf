"""What TaylorSeer caches in DiT: the core's ``dit`` preset (:mod:`taylorseer.attach.presets`).

Cached: the pre-gate outputs of ``blocks.i.attn`` and ``blocks.i.mlp`` (docs/dit.md). On a
forecast step each block runs a short forward instead of its own: the two gates (only their rows of
the adaLN matrix) and ``x + gate_msa * attn + gate_mlp * mlp`` with the forecasts folded in; the
block's own forward would also normalise and modulate the inputs of the two branches, for nothing.
With classifier-free guidance the conditional and unconditional halves run as one batch, so they
share one cache context, as upstream does.
"""

from __future__ import annotations

import torch

import taylorseer
from taylorseer import CacheConfig, ForecastCache

from .models import DiT

PRESET = "dit"


def attach_cache(model: DiT, config: CacheConfig, num_steps: int) -> ForecastCache:
    """Put the forecasting cache on every block's attn and mlp (also when disabled: hooks stay inert).

    The core's ``dit`` preset: each block described as two gated branches, so a forecast step runs the
    two gates and the fused gated adds only.
    """
    return taylorseer.apply(model, config, preset=PRESET, num_steps=num_steps)


def cached_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose outputs the cache records (from the preset: every block's attn and mlp)."""
    return taylorseer.presets.cached_modules(model, taylorseer.presets.get(PRESET))
