"""Every denoiser of a pipeline is cached (Wan 2.2's transformer_2), and remove() restores them bit for bit."""

from __future__ import annotations

import pytest
import tiny_pipelines as tiny
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import families

pytestmark = pytest.mark.usefixtures("one_thread")


def _wan22():
    """A tiny Wan 2.2 pipeline: ``transformer`` on the high-noise steps, ``transformer_2`` (other weights) after."""
    pipe = tiny.build("wan")
    second = families.build("wan", "smoke", seed=1).eval()
    pipe.register_modules(transformer_2=second)
    pipe.register_to_config(boundary_ratio=0.6)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dicts(module):
    return {name: sorted(m.__dict__) for name, m in module.named_modules()}


def test_wan22_caches_both_transformers():
    pipe = _wan22()
    ref = tiny.run(pipe, "wan", 8)
    before = [_dicts(pipe.transformer), _dicts(pipe.transformer_2)]  # after a call: diffusers' own registry is there
    seen = {}
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name)
        model.register_forward_pre_hook(lambda m, a, k, name=name: seen.__setitem__(name, seen.get(name, 0) + 1),
                                        with_kwargs=True)
    first = taylorseer.apply(pipe, CacheConfig(interval=1, max_order=1, first_enhance=2))
    second = taylorseer.get_cache(pipe.transformer_2)
    assert second is not None and second is not first
    assert torch.equal(tiny.run(pipe, "wan", 8), ref)  # interval 1: bit-identical, both cached
    assert seen["transformer"] > 0 and seen["transformer_2"] > 0
    assert "WanTransformer3DModel" in taylorseer.summary(pipe).describe().split("\n", 1)[1]  # both summarised
    taylorseer.remove(pipe)

    first = taylorseer.apply(pipe, CacheConfig(interval=3, max_order=1, first_enhance=1))
    second = taylorseer.get_cache(pipe.transformer_2)
    out = tiny.run(pipe, "wan", 8)
    for cache in (first, second):
        full = [r for r in cache.last_call.history if r.full]
        forecast = [r for r in cache.last_call.history if not r.full]
        assert full and forecast, cache.last_call.history  # each transformer computes and forecasts its part
    assert not torch.equal(out, ref)
    taylorseer.remove(pipe)
    for hook in list(pipe.transformer._forward_pre_hooks) + list(pipe.transformer_2._forward_pre_hooks):
        pipe.transformer._forward_pre_hooks.pop(hook, None)
        pipe.transformer_2._forward_pre_hooks.pop(hook, None)
    assert [_dicts(pipe.transformer), _dicts(pipe.transformer_2)] == before
    assert "progress_bar" not in pipe.__dict__
    assert torch.equal(tiny.run(pipe, "wan", 8), ref)


def test_wan22_each_transformer_counts_the_steps_of_its_part_of_the_loop():
    """``transformer`` runs the steps with t >= boundary_ratio * 1000, ``transformer_2`` the rest: each cache's
    sampling call is its part (its own step count, warm-up and last full steps), not the pipeline's whole loop."""
    pipe = _wan22()
    pipe.register_to_config(boundary_ratio=0.875)  # 12 steps: 4 high-noise, 8 low-noise
    steps = 12
    ref = tiny.run(pipe, "wan", steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high = int((pipe.scheduler.timesteps >= boundary).sum())
    assert (high, steps - high) == (4, 8)
    config = CacheConfig(interval=2, max_order=1, first_enhance=2, last_full_steps=1)
    first = taylorseer.apply(pipe, config)
    second = taylorseer.get_cache(pipe.transformer_2)
    out = tiny.run(pipe, "wan", steps)
    taylorseer.remove(pipe)
    for cache, count in ((first, high), (second, steps - high)):
        cond = [r for r in cache.last_call.history if r.context == "cond"]
        assert [r.step for r in cond] == list(range(count))  # indices from the part's first step
        full = [r.step for r in cond if r.full]
        # warm-up 2, then every 2nd step from the anchor (step 1), and the part's last step
        expected = sorted({0, 1, count - 1} | set(range(1, count, 2)))
        assert full == expected, (full, count)
    assert not torch.equal(out, ref)
    assert torch.equal(tiny.run(pipe, "wan", steps), ref)
