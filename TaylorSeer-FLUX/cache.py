"""What TaylorSeer caches in FLUX's transformer, and the forward of a block on a forecast step.

Paper / upstream: in each double-stream block the image attention (after its output projection), the
image MLP, the text attention and the text MLP; in each single-stream block the whole branch before its
gate (``proj_out``'s output, upstream ``linear2``). Modulation, embedders and the final layer always run.

Attached to diffusers' unmodified ``FluxTransformer2DModel`` (0.42.1 layout) through the core:

* ``transformer_blocks.*.attn`` (returns ``(img, txt)`` after both output projections),
  ``transformer_blocks.*.ff`` and ``transformer_blocks.*.ff_context`` are plain cached modules: on a full
  step they run and their outputs update the factors.
* Each double-stream block also gets a forward for forecast steps: the block's own forward would still
  normalise and modulate the inputs of ``attn``/``ff``/``ff_context`` (five passes over the tokens) only
  for the cached modules to ignore them. The short forward computes the two gates and the gated residual
  adds.
* Each single-stream block gets a forward that, on a full step, runs the original forward while a
  temporary hook records ``proj_out``'s output, and on a forecast step computes the gate alone and returns
  ``residual + gate * forecast``: no attention, no ``proj_mlp``, no concatenation run.

A forecast step must cost almost nothing next to a computed one, so it is written for memory traffic:
the forecast ``sum_i c_i F_i`` is folded into the gated residual add, one ``addcmul`` per factor
(order 1: two passes over the tokens per cached feature instead of four, no temporaries), and only the
gate rows of the modulation matrices are read. Same values as running the blocks with forecast module
outputs, up to float rounding (tested against that, to 1e-5 after 50 steps).

Text tokens on a forecast step: with no attention running, a text token's block output reaches nothing
(the next block's attention does not run and the model's output reads the image tokens only). By
default the forecast step therefore leaves the text stream as it is (and the text features that only it
would read, the single blocks' text tokens and the text MLP, are not stored), which saves a third of the
forecast step's memory traffic; ``forecast_text=True`` forecasts it too, so every block output follows
the paper token for token. The transformer's output is bit-identical either way (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import taylorseer
from taylorseer import CacheConfig, ForecastCache
from taylorseer.blockops import gated_add, modulation_chunk

DOUBLE_MODULES = ("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context")


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # diffusers clips fp16 block outputs to the finite range; keep the same convention.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block_override(forecast_text: bool = False) -> Callable:
    """Factory for ``transformer_blocks.<i>``: the original forward on full steps, the short one otherwise."""

    def factory(block: torch.nn.Module, original: Callable, cache: ForecastCache, name: str) -> Callable:
        attn_name, ff_name, ff_context_name = f"{name}.attn", f"{name}.ff", f"{name}.ff_context"

        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            if cache.is_full:
                return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            # AdaLayerNormZero: linear(silu(temb)) -> shift, scale, gate (attention), shift, scale, gate (MLP).
            # Shift and scale only feed the inputs of the cached modules, which do not run.
            emb = F.silu(temb)
            gate_msa = modulation_chunk(block.norm1.linear, emb, 6, 2).unsqueeze(1)
            gate_mlp = modulation_chunk(block.norm1.linear, emb, 6, 5).unsqueeze(1)
            attn = cache.terms(attn_name)  # outputs (img, txt) or (img, txt, ip) with an IP adapter
            # diffusers: h = h + g_msa * attn; h = h + g_mlp * ff (+ ip). Accumulated in one new buffer.
            out = gated_add(hidden_states, gate_msa, attn[0])
            out = gated_add(hidden_states, gate_mlp, cache.terms(ff_name)[0], out=out)
            for c, factor in attn[2] if len(attn) == 3 else ():
                out.add_(factor, alpha=c)
            if forecast_text:
                c_gate_msa = modulation_chunk(block.norm1_context.linear, emb, 6, 2).unsqueeze(1)
                c_gate_mlp = modulation_chunk(block.norm1_context.linear, emb, 6, 5).unsqueeze(1)
                text = gated_add(encoder_hidden_states, c_gate_msa, attn[1])
                text = gated_add(encoder_hidden_states, c_gate_mlp, cache.terms(ff_context_name)[0], text)
                encoder_hidden_states = _clip_fp16(text)
            return encoder_hidden_states, out

        return forward

    return factory


def single_block_override(forecast_text: bool = False) -> Callable:
    """Factory for ``single_transformer_blocks.<i>``: records ``proj_out`` on full steps, forecasts it otherwise.

    The feature is stored as ``<name>.img`` and, with ``forecast_text``, ``<name>.txt`` (image and text tokens
    of ``proj_out``'s output), so that a forecast step can forecast the image tokens alone.
    """

    def factory(block: torch.nn.Module, original: Callable, cache: ForecastCache, name: str) -> Callable:
        img_name, txt_name = f"{name}.img", f"{name}.txt"

        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            args = (hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            if not cache.config.enabled:
                return original(*args)
            text_len = encoder_hidden_states.shape[1]
            if cache.is_full:
                # diffusers' forward concatenates (text, image) tokens before proj_out; record both parts.
                def record(_module, _inputs, output):
                    cache.update(img_name, output[:, text_len:])
                    if forecast_text:  # otherwise never forecast: not worth its memory
                        cache.update(txt_name, output[:, :text_len])

                handle = block.proj_out.register_forward_hook(record)
                try:
                    return original(*args)
                finally:
                    handle.remove()
            # AdaLayerNormZeroSingle: linear(silu(temb)) -> shift, scale, gate; only the gate is needed.
            gate = modulation_chunk(block.norm.linear, F.silu(temb), 3, 2).unsqueeze(1)
            # diffusers: residual + gate * proj_out(...) on cat(text, image), then split. Elementwise, so the
            # image part is hidden + gate * F_img, without building the concatenation.
            hidden_states = _clip_fp16(gated_add(hidden_states, gate, cache.terms(img_name)[0]))
            if forecast_text:
                text = gated_add(encoder_hidden_states, gate, cache.terms(txt_name)[0])
                encoder_hidden_states = _clip_fp16(text)
            return encoder_hidden_states, hidden_states

        return forward

    return factory


def block_names(transformer: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Exact module names of the double- and single-stream blocks (fnmatch's ``*`` would also match children)."""
    double = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    single = [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]
    return double, single


def apply_flux_cache(
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
    double, single = block_names(transformer)
    overrides = {name: single_block_override(forecast_text) for name in single}
    if short_double:
        overrides.update({name: double_block_override(forecast_text) for name in double})
    # The text MLP's forecast is only read by the double block's own forward or with forecast_text.
    modules = [m for m in DOUBLE_MODULES if forecast_text or not short_double or not m.endswith("ff_context")]
    modules = modules if double else []
    # probe: the block schedule=adaptive runs on every step to decide (its cost is in the FLOPs).
    probe = double[0] if double else (single[0] if single else None)
    return taylorseer.apply(transformer, config, modules=modules, overrides=overrides, num_steps=num_steps,
                            probe=probe)


def apply_skip_all(transformer: torch.nn.Module, config: CacheConfig, num_steps: int | None = None) -> ForecastCache:
    """The ideal the cache is measured against: on forecast steps every block returns its inputs.

    Same schedule and hook machinery as :func:`apply_flux_cache`, no forecast work at all (wrong outputs,
    for timing only).
    """

    def skip(_block, original, cache, _name):
        def forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
            if cache.is_full:
                return original(hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)
            return encoder_hidden_states, hidden_states

        return forward

    double, single = block_names(transformer)
    return taylorseer.apply(transformer, config, overrides={name: skip for name in double + single},
                            num_steps=num_steps)
