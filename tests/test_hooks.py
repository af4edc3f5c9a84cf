"""Attaching and detaching the cache on an unmodified model; contexts; state reset; FLOPs."""

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig, count_schedule
from taylorseer_dit.models import DiT_models

MODULES = ("blocks.*.attn", "blocks.*.mlp")


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10, in_channels=4).eval()
    model.initialize_weights(zero_init=False)  # random gates: blocks are not identities
    return model


def trajectory(model, steps=12, seed=1):
    """Feed the model its own (damped) output for a few steps, like a sampler would."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([3, 7])
    outs = []
    with torch.no_grad():
        for s in range(steps):
            out = model(x, torch.full((2,), 999 - 80 * s), y)[:, :4]
            x = 0.9 * x + 0.1 * out
            outs.append(out)
    return torch.stack(outs)


def test_interval_one_is_bit_identical_to_no_cache():
    model = tiny_dit()
    reference = trajectory(model)
    taylorseer.apply(model, CacheConfig(interval=1, max_order=2, first_enhance=2), modules=MODULES)
    assert torch.equal(trajectory(model), reference)


def test_disabled_cache_is_bit_identical_and_stores_nothing():
    model = tiny_dit()
    reference = trajectory(model)
    cache = taylorseer.apply(model, CacheConfig(interval=4, enabled=False), modules=MODULES)
    assert torch.equal(trajectory(model), reference)
    assert cache.nbytes() == 0


def test_remove_restores_the_model_exactly():
    model = tiny_dit()
    reference = trajectory(model)
    cache = taylorseer.apply(model, CacheConfig(interval=4, max_order=1, first_enhance=2), modules=MODULES)
    assert not torch.equal(trajectory(model), reference)  # the cache really forecasts
    assert cache.nbytes() > 0
    taylorseer.remove(model)
    assert taylorseer.get_cache(model) is None
    assert "forward" not in model.blocks[0].attn.__dict__
    assert not model._forward_pre_hooks
    assert torch.equal(trajectory(model), reference)


def test_two_calls_in_a_row_are_identical_with_reset_or_num_steps():
    model = tiny_dit()
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=2, first_enhance=2), modules=MODULES)
    first = trajectory(model)
    cache.reset()
    assert torch.equal(trajectory(model), first)
    # Without reset() but with num_steps known, the schedule restarts on its own.
    taylorseer.remove(model)
    taylorseer.apply(model, CacheConfig(interval=3, max_order=2, first_enhance=2), modules=MODULES, num_steps=12)
    assert torch.equal(trajectory(model), first)
    assert torch.equal(trajectory(model), first)


def test_schedule_recorded_per_call():
    model = tiny_dit()
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=2), modules=MODULES)
    trajectory(model, steps=12)
    assert [r.step for r in cache.history if r.full] == [0, 1, 4, 7, 10]


def test_contexts_keep_separate_state():
    model = tiny_dit()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([1])
    cache = taylorseer.apply(model, CacheConfig(interval=2, max_order=1, first_enhance=1), modules=MODULES)
    with torch.no_grad():
        for _ in range(3):
            with cache.context("cond"):
                model(x, t, y)
            with cache.context("uncond"):
                model(x, t, torch.tensor([10]))
    steps = [(r.context, r.step, r.full) for r in cache.history]
    assert steps == [("cond", 0, True), ("uncond", 0, True), ("cond", 1, False), ("uncond", 1, False),
                     ("cond", 2, True), ("uncond", 2, True)]
    per_context = cache.nbytes() // 2
    assert per_context == 2 * 2 * (2 * 1 * 16 * 64 * 4)  # 2 blocks x (attn, mlp) x (O+1) x (1,16,64) fp32


def test_errors_are_clear():
    model = tiny_dit()
    with pytest.raises(ValueError, match=r"no submodule matches 'blocks\.\*\.attention'"):
        taylorseer.apply(model, CacheConfig(), modules=["blocks.*.attention"])
    taylorseer.apply(model, CacheConfig(), modules=MODULES)
    with pytest.raises(RuntimeError, match="already attached"):
        taylorseer.apply(model, CacheConfig(), modules=MODULES)


def test_forecast_step_flops_count_only_what_still_runs():
    model = tiny_dit()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([1])
    cache = taylorseer.apply(model, CacheConfig(interval=6, max_order=1, first_enhance=3), modules=MODULES)
    report = count_schedule(lambda: model(x, t, y), cache, num_steps=50)
    d, tokens, depth = 64, 16, 2
    # Forecast call: embedders (patch conv, timestep MLP), adaLN linears of the blocks, final layer.
    patch = 2 * tokens * d * 4 * 2 * 2
    t_mlp = 2 * (256 * d + d * d)
    ada = depth * 2 * d * 6 * d
    final = 2 * d * 2 * d + 2 * tokens * d * (2 * 2 * 8)
    assert report.forecast_step_flops == patch + t_mlp + ada + final
    # Full call adds attention (qkv, scores, values, proj) and MLP for every block.
    attn = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d
    mlp = 2 * 2 * tokens * d * 4 * d
    assert report.full_step_flops == report.forecast_step_flops + depth * (attn + mlp)
    assert report.full_steps == 10
    assert report.flops_total == 10 * report.full_step_flops + 40 * report.forecast_step_flops
    assert cache.history == []  # the count leaves no state behind


def test_reset_keeps_a_summary_of_the_finished_call():
    # diffusers pipelines reset the cache when they return; what the call did stays readable
    model = tiny_dit()
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=2), modules=MODULES)
    trajectory(model, steps=12)
    held = cache.nbytes()
    cache.reset()
    assert cache.nbytes() == 0 and cache.history == []
    assert cache.last_call.nbytes == held > 0
    assert cache.last_call.full_steps() == {"default": 5}
    cache.reset()  # nothing ran since: the summary stays
    assert cache.last_call.nbytes == held


def test_a_bad_override_pattern_leaves_the_model_untouched():
    # Every pattern is matched before anything is wrapped: no orphan cache that remove() cannot undo.
    model = tiny_dit()
    reference = trajectory(model)

    def factory(module, original, cache, name):
        return original

    with pytest.raises(ValueError, match=r"no submodule matches 'blocks\.\*\.nothing'"):
        taylorseer.apply(model, CacheConfig(interval=3), modules=MODULES, overrides={"blocks.*.nothing": factory})
    assert taylorseer.get_cache(model) is None and not model._forward_pre_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(trajectory(model), reference)
    taylorseer.apply(model, CacheConfig(interval=3), modules=MODULES)  # and it can be attached afterwards


def test_a_batch_that_changes_within_a_call_is_refused_not_broadcast():
    model = tiny_dit()
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=1), modules=MODULES)
    t, g = torch.tensor([500]), torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randn(4, 4, 8, 8, generator=g), t.repeat(4), torch.arange(4))  # step 0: full, batch 4
        for batch in (1, 6):  # step 1 would forecast sample 0's features for every sample / a raw shape error
            with pytest.raises(RuntimeError, match=rf"batch size changed from 4 to {batch} at step 1.*cache.reset"):
                model(torch.randn(batch, 4, 8, 8, generator=g), t.repeat(batch), torch.arange(batch))
            cache._ctx.step = 0  # the refused call still counted its step; undo that for the next try
        cache.reset()  # what the message says to do: a new call with the new batch then works
        out = model(torch.randn(2, 4, 8, 8, generator=g), t.repeat(2), torch.arange(2))
    assert out.shape[0] == 2 and cache.step == 0


def test_timestep_distance_refuses_a_constant_timestep():
    model = tiny_dit()
    taylorseer.apply(model, CacheConfig(interval=2, max_order=1, first_enhance=1, step_distance="timestep"),
                     modules=MODULES)
    x, y = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with torch.no_grad():
        model(x, torch.tensor([500]), y)
        with pytest.raises(ValueError, match="timestep did not change.*step_distance=index"):
            model(x, torch.tensor([500]), y)  # before: 0/0 derivatives, NaN outputs


def test_flops_count_with_offload_works_on_the_meta_device():
    # The count reaches the cache's update on meta tensors; offload used to copy those to the host and crash.
    with torch.device("meta"):
        model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10, in_channels=4).eval()
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, offload=True), modules=MODULES)
    x, t, y = (torch.zeros(1, 4, 8, 8, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
               torch.zeros(1, dtype=torch.long, device="meta"))
    report = count_schedule(lambda: model(x, t, y), cache, num_steps=12)
    assert report.full_step_flops > report.forecast_step_flops > 0
    assert cache.config.offload  # the cache's own setting is back


def test_a_forecast_the_caller_keeps_is_not_changed_by_later_steps():
    """Order 0 (FORA, or the first steps after the warm-up) forecasts a stored factor as it is: the cache must
    hand out a copy, since it updates its factors in place at the next full step."""

    class Branch(torch.nn.Module):
        def forward(self, x, t):
            return x + 0.3 * t

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = Branch()

        def forward(self, x, timestep):
            return self.branch(x, timestep)

    for order in (0, 1):
        model = Model()
        taylorseer.apply(model, CacheConfig(interval=3, max_order=order, first_enhance=1), modules=["branch"],
                         num_steps=7)
        x = torch.zeros(2, 4)
        kept = [model(x, torch.tensor(float(s))) for s in range(7)]
        # steps 0, 3, 6 computed; 1, 2 forecast from step 0 alone (reuse), 4, 5 reuse (O=0) or extrapolate (O=1)
        expected = [0.0, 0.0, 0.0, 0.9, 0.9 if order == 0 else 1.2, 0.9 if order == 0 else 1.5, 1.8]
        assert [round(float(k[0, 0]), 4) for k in kept] == expected
        kept[1].add_(100.0)  # the caller's in-place change stays the caller's
        assert float(model(x, torch.tensor(0.0))[0, 0]) == 0.0 and float(kept[2][0, 0]) == 0.0
