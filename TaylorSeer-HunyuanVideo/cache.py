"""Which parts of diffusers' ``HunyuanVideoTransformer3DModel`` the forecasting cache holds.

As in the paper (and upstream's defaults: N=5, O=1, warm-up 1):

* double-stream block ``transformer_blocks.i`` (20 in the real model): the joint attention
  (``.attn``: image and text outputs after their output projections, one tuple) and the two
  feed-forwards (``.ff`` image, ``.ff_context`` text). They are plain cached modules: on a forecast
  step the block still runs its AdaLN modulation, gates and residual adds with the current
  conditioning, and the attention/MLP modules return their forecasts instead of running.
* single-stream block ``single_transformer_blocks.i`` (40): the attention (``.attn``, recorded on
  full steps as the paper does; ``single_attention=False`` skips this record, see
  :func:`module_patterns`) and the whole branch before its gate (``.proj_out``'s output,
  i.e. ``proj_out(cat(attn, mlp))``). On a forecast step *nothing* of the branch may run (no
  attention, no MLP projection, no concat), so the block's forward is replaced: it computes only
  the gate from ``block.norm``'s modulation linear and returns ``residual + gate * forecast``, split
  back into the (video, text) pair the block returns.

Nothing in diffusers' code mutates these outputs in place (the blocks form ``h + out * gate`` into new
tensors; the single-block attention returns slices that the core copies into buffers it owns), so
an order-0 forecast may hand out the stored buffer itself.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformer3DModel,
    HunyuanVideoTransformerBlock,
)

import taylorseer
from taylorseer import CacheConfig, ForecastCache
from taylorseer.blockops import gated_add, modulation_chunk

# Plain cached modules: their outputs are the cached features (fnmatch patterns over named_modules()).
DOUBLE_MODULES = ("transformer_blocks.*.attn", "transformer_blocks.*.ff", "transformer_blocks.*.ff_context")
SINGLE_ATTENTION = "single_transformer_blocks.*.attn"
SINGLE_BRANCH = "single_transformer_blocks.*.proj_out"
CACHED_MODULES = DOUBLE_MODULES + (SINGLE_ATTENTION, SINGLE_BRANCH)


def module_patterns(single_attention: bool = True) -> tuple[str, ...]:
    """The cached modules' patterns.

    ``single_attention=False`` leaves out the single blocks' attention record: a forecast step
    forecasts their whole branch and never reads it, so the videos are the same and the cache is a
    third smaller (the paper records it; True is paper-exact).
    """
    return CACHED_MODULES if single_attention else DOUBLE_MODULES + (SINGLE_BRANCH,)


def attach(transformer: HunyuanVideoTransformer3DModel, config: CacheConfig, num_steps: int | None = None,
           single_attention: bool = True) -> ForecastCache:
    """Put the forecasting cache on ``transformer`` (undo with ``taylorseer.remove(transformer)``)."""
    _check_blocks(transformer)
    patterns = module_patterns(single_attention)
    single = {f"single_transformer_blocks.{i}": single_block_forward
              for i in range(len(transformer.single_transformer_blocks))}
    # probe: the block schedule=adaptive runs on every step to decide (its cost is in the FLOPs).
    return taylorseer.apply(transformer, config, modules=list(patterns), overrides=single, num_steps=num_steps,
                            probe="transformer_blocks.0" if len(transformer.transformer_blocks) else None)


def cached_module_names(transformer: torch.nn.Module, single_attention: bool = True) -> list[str]:
    """Names of the modules whose outputs are cached (the single blocks' ``proj_out`` is their branch)."""
    patterns = module_patterns(single_attention)
    return [n for n, _ in transformer.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def single_block_forward(block: HunyuanVideoSingleTransformerBlock, original: Callable, cache: ForecastCache,
                         name: str) -> Callable:
    """Forward for one single-stream block: full steps run the original, forecast steps only the gate.

    On a full step the original forward runs; its ``attn`` and ``proj_out`` submodules are plain
    cached modules, so they record the attention output and the pre-gate branch as they run.
    """
    branch_name = f"{name}.proj_out"
    norm = block.norm

    def forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        if cache.is_full:
            return original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        # AdaLayerNormZeroSingle: linear(silu(temb)) -> (shift, scale, gate); only the gate is needed
        # (and only its rows of the matrix are read) because the normalised input feeds nothing but the
        # skipped branch.
        gate = modulation_chunk(norm.linear, norm.silu(temb), 3, 2).unsqueeze(1)  # (B, 1, C)
        (terms,) = cache.terms(branch_name)  # factors of (B, N_video + N_text, C)
        n_video = hidden_states.shape[1]
        # Same arithmetic as the block, residual + gate * branch, with the forecast folded into one addcmul
        # per factor and the residual never concatenated.
        video = gated_add(hidden_states, gate, [(c, f[:, :n_video]) for c, f in terms])
        text = gated_add(encoder_hidden_states, gate, [(c, f[:, n_video:]) for c, f in terms])
        return video, text

    return forward


def _check_blocks(transformer: torch.nn.Module) -> None:
    """Only the text-to-video blocks are supported; the image-to-video (token-replace) ones differ."""
    kinds = {type(b) for b in getattr(transformer, "transformer_blocks", [])} | {
        type(b) for b in getattr(transformer, "single_transformer_blocks", [])}
    expected = {HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock}
    if not kinds or not kinds <= expected:
        found = sorted(k.__name__ for k in kinds) or ["no transformer_blocks"]
        raise TypeError(f"TaylorSeer-HunyuanVideo caches HunyuanVideoTransformer3DModel's text-to-video blocks; "
                        f"found {found} (image-to-video token-replace blocks are not supported)")
