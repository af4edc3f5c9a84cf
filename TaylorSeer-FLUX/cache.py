"""What TaylorSeer caches in FLUX's transformer: the core's ``flux`` preset (:mod:`taylorseer.presets`).

Paper / upstream: in each double-stream block the image attention (after its output projection), the
image MLP, the text attention and the text MLP; in each single-stream block the whole branch before its
gate (``proj_out``'s output, upstream ``linear2``). Modulation, embedders and the final layer always run.

The preset describes both block kinds of diffusers' unmodified ``FluxTransformer2DModel`` (0.42.1 layout)
as residual branches, and the core derives from that what to record on a full step and the short forward
of a forecast step:

* double-stream block: ``attn`` (image output; the IP-adapter output when there is one) and ``ff`` are
  recorded; a forecast step computes the two gates (only their rows of ``norm1.linear``) and
  ``h + g_msa * F_attn + g_mlp * F_ff`` with the forecasts folded into the adds;
* single-stream block: ``proj_out``'s output over ``cat(text, image)`` is recorded on full steps (its image
  tokens); a forecast step computes the gate alone and returns ``residual + gate * forecast``: no attention,
  no ``proj_mlp``, no concatenation run.

A forecast step must cost almost nothing next to a computed one, so it is written for memory traffic:
the forecast ``sum_i c_i F_i`` is folded into the gated residual add, one ``addcmul`` per factor
(order 1: two passes over the tokens per cached feature instead of four, no temporaries), and only the
gate rows of the modulation matrices are read. Same values as running the blocks with forecast module
outputs, up to float rounding (tested against that, to 1e-5 after 50 steps).

Text tokens on a forecast step: with no attention running, a text token's block output reaches nothing
(the next block's attention does not run and the model's output reads the image tokens only). By
default the forecast step therefore leaves the text stream as it is (and the text features that only it
would read are not stored), which saves a third of the forecast step's memory traffic;
``forecast_text=True`` forecasts it too, so every block output follows the paper token for token. The
transformer's output is bit-identical either way (tested).
"""

from __future__ import annotations

import torch

import taylorseer
from taylorseer import CacheConfig, ForecastCache

PRESET = "flux"


def attach_cache(
    transformer: torch.nn.Module,
    config: CacheConfig,
    num_steps: int | None = None,
    *,
    forecast_text: bool = False,
    short_double: bool = True,
) -> ForecastCache:
    """Attach TaylorSeer to a diffusers ``FluxTransformer2DModel`` and return the cache.

    Args:
        transformer: the pipeline's transformer, unmodified.
        config: the cache settings (paper: ``CacheConfig(interval=6, max_order=1, first_enhance=3)``).
        num_steps: sampling steps per pipeline call.
        forecast_text: also forecast the text tokens on forecast steps (see the module docstring).
        short_double: use the short forecast-step forward of the double-stream blocks (same output up to
            float rounding; False leaves the double blocks' own forward in place, the plain-cached-modules way).
    """
    preset = taylorseer.presets.get(PRESET, forecast_text=forecast_text, short_double=short_double)
    return taylorseer.apply(transformer, config, preset=preset, num_steps=num_steps)


def cached_module_names(transformer: torch.nn.Module, *, forecast_text: bool = False,
                        short_double: bool = True) -> list[str]:
    """Names of the modules whose outputs the cache records, from the preset: each double block's ``attn`` and ``ff``
    (and ``ff_context`` with ``forecast_text`` or without ``short_double``), each single block's ``proj_out``."""
    preset = taylorseer.presets.get(PRESET, forecast_text=forecast_text, short_double=short_double)
    return taylorseer.presets.cached_modules(transformer, preset)
