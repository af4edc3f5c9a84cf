"""Which parts of diffusers' ``HunyuanVideoTransformer3DModel`` the forecasting cache holds.

As in the paper (and upstream's defaults: N=5, O=1, warm-up 1):

* double-stream block ``transformer_blocks.i`` (20 in the real model): the joint attention
  (``.attn``: image and text outputs after their output projections, one tuple) and the two
  feed-forwards (``.ff`` image, ``.ff_context`` text). They are plain cached modules: on a forecast
  step the block still runs its AdaLN modulation, gates and residual adds with the current
  conditioning, and the attention/MLP modules return their forecasts instead of running.
* single-stream block ``single_transformer_blocks.i`` (40): the attention (``.attn``, recorded on
  full steps as the paper does; ``single_attention=False`` skips this record, see
  :func:`cached_module_names`) and the whole branch before its gate (``.proj_out``'s output,
  i.e. ``proj_out(cat(attn, mlp))``). On a forecast step *nothing* of the branch may run (no
  attention, no MLP projection, no concat), so the block's forward is replaced: it computes only
  the gate from ``block.norm``'s modulation linear and returns ``residual + gate * forecast``, split
  back into the (video, text) pair the block returns.

Nothing in diffusers' code mutates these outputs in place (the blocks form ``h + out * gate`` into new
tensors; the single-block attention returns slices that the core copies into buffers it owns), so
an order-0 forecast may hand out the stored buffer itself.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformer3DModel

import taylorseer
from taylorseer import CacheConfig, ForecastCache

PRESET = "hunyuan_video"


def attach_cache(transformer: HunyuanVideoTransformer3DModel, config: CacheConfig, num_steps: int | None = None,
                 single_attention: bool = True) -> ForecastCache:
    """Put the forecasting cache on ``transformer`` (undo with ``taylorseer.remove(transformer)``).

    The core's ``hunyuan_video`` preset: double blocks as plain cached modules, single blocks described as
    one gated branch over ``cat(video, text)`` (gate-only short forward on forecast steps).
    """
    preset = taylorseer.presets.get(PRESET, single_attention=single_attention)
    return taylorseer.apply(transformer, config, preset=preset, num_steps=num_steps)


def cached_module_names(transformer: torch.nn.Module, single_attention: bool = True) -> list[str]:
    """Names of the modules whose outputs are cached, from the preset (the single blocks' ``proj_out`` is their
    branch; ``single_attention=False`` leaves out the single blocks' attention record: a forecast step forecasts
    their whole branch and never reads it, so the videos are the same and the cache is a third smaller)."""
    preset = taylorseer.presets.get(PRESET, single_attention=single_attention)
    return taylorseer.presets.cached_modules(transformer, preset)
