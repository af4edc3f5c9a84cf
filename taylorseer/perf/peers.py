"""Diffusers' own TaylorSeer hook (``diffusers.hooks.taylorseer_cache``) as a baseline in the same harness.

The FLUX and HunyuanVideo apps take ``cache_impl=diffusers``: the same N, O and warm-up are handed to
``transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=N, disable_cache_before_step=W,
max_order=O))``. Diffusers hooks every attention module by default (not the feed-forwards) and decides
per step with its own rule, step ``s`` computed when ``s < W`` or ``(s - W - 1) % N == 0``: at N=6, W=3
that is 11 of 50 steps (0, 1, 2, 4, 10, ..., 46) where this project computes 10. Its FLOPs are counted
the same way as ours: one computed and one forecast call of the real architecture on the meta device
(the schedule from :func:`diffusers_full_steps`, checked against the hook in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.config import CacheConfig
from .flops import FlopsReport, count_flops

IMPLS = ("taylorseer", "diffusers")


def diffusers_config(config: CacheConfig):
    """diffusers' ``TaylorSeerCacheConfig`` with this config's N, O and warm-up (its factor dtype: ours, or
    diffusers' bf16 default for ``auto``)."""
    from diffusers import TaylorSeerCacheConfig

    dtype = torch.bfloat16 if config.factor_dtype == "auto" else getattr(torch, config.factor_dtype)
    return TaylorSeerCacheConfig(cache_interval=config.interval, disable_cache_before_step=config.first_enhance,
                                 max_order=config.max_order, taylor_factors_dtype=dtype)


def diffusers_full_steps(num_steps: int, config: CacheConfig) -> list[int]:
    """The steps diffusers' hook computes (its ``_measure_should_compute``), for the FLOPs and the tables."""
    w, n = config.first_enhance, config.interval
    return [s for s in range(num_steps) if s < w or (s - w - 1) % n == 0]


def enable(transformer, config: CacheConfig) -> None:
    if not hasattr(transformer, "enable_cache"):
        raise ValueError(f"cache_impl=diffusers needs a diffusers model with CacheMixin; "
                         f"{type(transformer).__name__} has none: use cache_impl=taylorseer")
    transformer.enable_cache(diffusers_config(config))


def disable(transformer) -> None:
    transformer.disable_cache()


def count_diffusers_schedule(model, call: Callable[[], object], config: CacheConfig, num_steps: int,
                             calls_per_step: int = 1) -> FlopsReport:
    """FLOPs of a sampling run with diffusers' hook on ``model`` (a meta-device copy is fine): the first full
    and the first forecast call are counted, the rest follows from :func:`diffusers_full_steps`."""
    full = diffusers_full_steps(num_steps, config)
    first_forecast = next((s for s in range(num_steps) if s not in full), None)
    model.enable_cache(diffusers_config(config))
    counts = {}
    try:
        for step in range(num_steps if first_forecast is None else first_forecast + 1):
            with model.cache_context("cond"):
                if step in (0, first_forecast):
                    counts[step] = count_flops(call)
                else:
                    call()
    finally:
        model.disable_cache()
    forecast = counts.get(first_forecast, counts[0])
    return FlopsReport(num_steps, len(full), calls_per_step, counts[0], forecast)
