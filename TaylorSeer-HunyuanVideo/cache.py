"""Which parts of diffusers' ``HunyuanVideoTransformer3DModel`` the forecasting cache holds.

Two forms of the core's ``hunyuan_video`` preset, chosen by ``cache.forecast_step``:

* **lean** (the default, ``forecast_step=collapsed``): in each double-stream block
  ``transformer_blocks.i`` (20 in the real model) the video outputs of the joint attention (``.attn``,
  output 0) and of the video feed-forward (``.ff``); in each single-stream block
  ``single_transformer_blocks.i`` (40) the video tokens of the whole branch before its gate (``.proj_out``'s
  output, i.e. ``proj_out(cat(attn, mlp))``). On a forecast step every block runs a gate-only short forward
  (the gate rows of its modulation, then ``residual + gate * forecast``), and every block is in one collapsed
  run (one update of the video stream, :mod:`taylorseer.attach.collapse`). The text tokens are not forecast:
  on a forecast step nothing reads them (no attention runs, and the output is the video tokens'), so the video
  is upstream's to float rounding (tests/test_hunyuan_video.py measures it) with far fewer kernels and bytes.
* **upstream's** (``forecast_step=per_block``, the paper's, oracle-exact against upstream TaylorSeer; N=5, O=1,
  warm-up 1): the double blocks' ``.attn`` (video and text), ``.ff`` and ``.ff_context`` as plain cached modules
  (on a forecast step the block still runs its AdaLN modulation, gates and residual adds with the current
  conditioning, and the attention/MLP modules return their forecasts); the single blocks' whole branch over
  ``cat(video, text)`` (gate-only short forward) and their attention (``.attn``, recorded on full steps as the
  paper does, never read; ``single_attention=False`` skips this record, see :func:`cached_module_names`).

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
UPSTREAM_FORM = "per_block"  # the cache.forecast_step that keeps upstream's form


def preset(forecast_step: str = "collapsed", single_attention: bool = True):
    """The app's preset: lean under every forecast step but ``per_block``, which keeps upstream's form
    (``single_attention`` is upstream's single-block attention record: the lean form records no attention)."""
    if forecast_step == UPSTREAM_FORM:
        return taylorseer.presets.get(PRESET, single_attention=single_attention)
    return taylorseer.presets.get(PRESET, single_attention=False, lean=True)


def attach_cache(transformer: HunyuanVideoTransformer3DModel, config: CacheConfig, num_steps: int | None = None,
                 single_attention: bool = True) -> ForecastCache:
    """Put the forecasting cache on ``transformer`` (undo with ``taylorseer.remove(transformer)``), in the form
    ``config.forecast_step`` chooses (:func:`preset`)."""
    return taylorseer.apply(transformer, config, preset=preset(config.forecast_step, single_attention),
                            num_steps=num_steps)


def cached_module_names(transformer: torch.nn.Module, single_attention: bool = True,
                        forecast_step: str = "collapsed") -> list[str]:
    """Names of the modules whose outputs are cached in the form ``forecast_step`` chooses (the single blocks'
    ``proj_out`` is their branch; under ``per_block``, ``single_attention=False`` leaves out the single blocks'
    attention record: a forecast step forecasts their whole branch and never reads it, so the videos are the same
    and the cache is a third smaller)."""
    return taylorseer.presets.cached_modules(transformer, preset(forecast_step, single_attention))
