"""The collapsed forecast step (cache.forecast_step=collapsed, the default): one update per residual stream.

Against the per-block path (forecast_step=per_block, upstream's op order): the same samples to float rounding
on every preset (fp32: 1e-6 relative), no further from the fp32 result in bf16 than the per-block bf16 path, the
same under every forecaster; work between blocks splits a run; the kernels of a forecast step at full size (meta
device) do not depend on the number of blocks and stay within 2x of the bound's (every block skipped).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig, presets
from taylorseer.attach import families

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12


def _loop(case: families.BenchCase, steps: int = STEPS) -> torch.Tensor:
    return families.sample(case, steps)


def _run(case, config, **options):
    preset = presets.get(families.family_of(case.model), **options)
    cache = taylorseer.apply(case.model, config, preset=preset, num_steps=STEPS)
    try:
        out = _loop(case)
    finally:
        taylorseer.remove(case.model)
    return out, cache


def _links(cache) -> dict:
    """The collapser's block links in the context the loop ran in (``cache_context("cond")`` on diffusers models)."""
    with cache.context(cache.last_call.history[-1].context):
        return dict(cache.collapser.next)


def _forecasts(cache) -> int:
    return sum(not r.full for r in cache.last_call.history)  # (remove() reset the cache: its last call)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", families.NAMES)
def test_collapsed_equals_per_block_on_every_preset(smoke_cases, name, order):
    case = smoke_cases(name)
    config = CacheConfig(interval=3, max_order=order, first_enhance=1)
    options = {"lean": True} if name == "hunyuan_video" else {}
    per_block, _ = _run(case, dataclasses.replace(config, forecast_step="per_block"), **options)
    collapsed, cache = _run(case, config, **options)
    uncached = _loop(case)
    assert _rel(per_block, uncached) > 1e-4  # forecasts happened
    assert _rel(collapsed, per_block) < 1e-6
    collapser = cache.collapser
    # Every collapsible block is in one run (each linked to the next), computed once per forecast step at its head
    # (Flux2's double blocks and Lumina2's refiners run per block: their streams have other token counts).
    blocks = presets.find(case.model).blocks(case.model)
    assert len(collapser.entries) == sum(spec.collapse for spec in blocks.values())
    assert len(_links(cache)) == len(collapser.entries) - 1
    forecast_steps = _forecasts(cache)
    assert collapser.heads == forecast_steps > 0


def test_hunyuan_video_is_lean_by_default_under_collapsed_and_upstream_per_block(smoke_cases):
    case = smoke_cases("hunyuan_video")
    config = CacheConfig(interval=3, max_order=1, first_enhance=1)
    cache = taylorseer.apply(case.model, config, num_steps=STEPS)
    lean = _loop(case)
    taylorseer.remove(case.model)
    assert len(cache.collapser.entries) == 4  # double blocks short too
    per_block = taylorseer.apply(case.model, dataclasses.replace(config, forecast_step="per_block"),
                                 num_steps=STEPS)
    upstream = _loop(case)
    taylorseer.remove(case.model)
    assert per_block.collapser is None
    assert _rel(lean, upstream) < 1e-5
    named = taylorseer.apply(case.model, config, preset="hunyuan_video", num_steps=STEPS)  # asked for by name
    taylorseer.remove(case.model)
    assert named.collapser.entries == {}  # upstream's form: every block per block


@pytest.mark.parametrize("forecaster", ["taylor", "newton", "hermite", "feedback"])
def test_collapsed_composes_with_every_forecaster(smoke_cases, forecaster):
    case = smoke_cases("flux")
    config = CacheConfig(interval=3, max_order=2, first_enhance=1, forecaster=forecaster)
    per_block, _ = _run(case, dataclasses.replace(config, forecast_step="per_block"))
    collapsed, cache = _run(case, config)
    assert cache.collapser.heads > 0 and _rel(collapsed, per_block) < 1e-6


def test_adaptive_schedule_and_uncovered_settings(smoke_cases):
    case = smoke_cases("wan")
    adaptive = CacheConfig(interval=4, max_order=1, first_enhance=1, schedule="adaptive", threshold=0.5)
    per_block, _ = _run(case, dataclasses.replace(adaptive, forecast_step="per_block"))
    collapsed, cache = _run(case, adaptive)
    assert cache.collapser.heads > 0 and _rel(collapsed, per_block) < 1e-6
    # 8-bit factors and offloaded ones run per block: the very same ops, the same result bit for bit.
    for changes in (dict(factor_store="float8"), dict(offload=True)):
        config = CacheConfig(interval=3, max_order=1, first_enhance=1, **changes)
        per_block, _ = _run(case, dataclasses.replace(config, forecast_step="per_block"))
        collapsed, cache = _run(case, config)
        assert cache.collapser.heads == 0 and torch.equal(collapsed, per_block)


def test_work_between_blocks_splits_the_run(smoke_cases):
    case = smoke_cases("pixart")
    config = CacheConfig(interval=3, max_order=1, first_enhance=1)
    block = case.model.transformer_blocks[0]
    handle = block.register_forward_hook(lambda _m, _i, out: out * 1.0)  # a new tensor between blocks 0 and 1
    try:
        per_block, _ = _run(case, dataclasses.replace(config, forecast_step="per_block"))
        collapsed, cache = _run(case, config)
    finally:
        handle.remove()
    forecast_steps = _forecasts(cache)
    assert _links(cache) == {} and cache.collapser.heads == 2 * forecast_steps
    assert _rel(collapsed, per_block) < 1e-6


def test_bf16_collapsed_is_no_further_from_fp32_than_per_block():
    case = families.bench_case("flux", "smoke", batch=2)
    config = CacheConfig(interval=3, max_order=1, first_enhance=1, forecast_step="per_block")
    reference, _ = _run(case, config)
    case.model.to(torch.bfloat16)
    case.inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in case.inputs.items()}
    per_block, _ = _run(case, config)
    collapsed, _ = _run(case, dataclasses.replace(config, forecast_step="collapsed"))
    assert _rel(collapsed, reference) <= _rel(per_block, reference)


def test_interval_one_is_bit_identical_to_no_cache(smoke_cases):
    case = smoke_cases("sd3")
    uncached = _loop(case)
    out, cache = _run(case, CacheConfig(interval=1, max_order=2, first_enhance=1))
    assert torch.equal(out, uncached) and cache.collapser.heads == 0


def test_the_tag_names_the_per_block_path_only():
    assert CacheConfig().tag == "N6-O1-W3"
    assert CacheConfig(forecast_step="per_block").tag == "N6-O1-W3-pb"
    assert CacheConfig.from_dict(CacheConfig(forecast_step="per_block").to_dict()).forecast_step == "per_block"
    with pytest.raises(ValueError, match="forecast_step"):
        CacheConfig(forecast_step="fused")


@pytest.mark.parametrize("name", ["dit-xl-2", "flux-dev", "hunyuan-video"])
def test_forecast_step_kernels_at_full_size_do_not_grow_with_depth(name):
    """Counted on the meta device (bf16, full size): within 2x of the bound, the same count at half the depth."""
    from taylorseer_eval import forecast_kernels

    full = forecast_kernels.count(name, order=1)
    half = forecast_kernels.count(name, order=1, depth=0.5, variants=("collapsed", "bound"))
    assert full["collapsed"] <= 2 * full["bound"] < full["per_block"]
    assert full["collapsed"] - full["bound"] == half["collapsed"] - half["bound"] <= 10
    assert full["collapsed"] == {"dit-xl-2": 33, "flux-dev": 97, "hunyuan-video": 190}[name]
    assert full["bound"] == {"dit-xl-2": 25, "flux-dev": 89, "hunyuan-video": 182}[name]


@pytest.mark.parametrize("kernel", ["auto", "inductor"])
@pytest.mark.parametrize("channels_first", [False, True])
def test_the_stream_update_equals_the_formula_chained_and_compiled(kernel, channels_first):
    """``auto`` on a CPU with fp32 factors is the addcmul chain (faster there than the compiled pass over many
    slots); ``inductor`` the compiled pass. Both equal the formula, whatever the stream's layout (Sana's comes
    channels-first from its patch embedding)."""
    from taylorseer.core import arena
    from taylorseer.core.kernels import forecast_kernel

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, 256, generator=g)  # 2^17 elements: the compiled kernel on a CPU with a compiler
    if channels_first:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    factors = torch.randn(6, 1, 512, 256, generator=g)
    coeffs = torch.randn(1, 6, 256, generator=g).transpose(0, 1)
    calls = []
    chain = arena._chain
    with forecast_kernel(kernel), pytest.MonkeyPatch.context() as mp:
        mp.setattr(arena, "_chain", lambda *a: calls.append(1) or chain(*a))
        out = arena.stream_update(x, factors, coeffs)
    assert len(calls) == (kernel == "auto")
    torch.testing.assert_close(out, arena._eager(x, factors, coeffs), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, x + (factors * coeffs[:, :, None]).sum(0), rtol=1e-6, atol=1e-5)
    assert not arena._broken
