"""Where a sampling call starts and ends: pipelines, diffusers' step index, and bare models."""

from __future__ import annotations

import pytest
import tiny_pipelines as tiny
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import families
from taylorseer_dit.models import DiT_models

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = CacheConfig(interval=3, max_order=1, first_enhance=2)


def tiny_dit():
    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10).eval()
    model.initialize_weights(zero_init=False)
    return model


def loop(model, steps, start=999, stride=80):
    """A sampler over the model's own outputs; timesteps go down from ``start``."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7])
    outs = []
    with torch.no_grad():
        for s in range(steps):
            out = model(x, torch.full((2,), start - stride * s), y)[:, :4]
            x = 0.9 * x + 0.1 * out
            outs.append(out)
    return torch.stack(outs)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = tiny.load(name, tiny.save(name, tmp_path_factory.mktemp(name)))
        return loaded[name]

    return get


# ------------------------------------------------------------------------------------------- bare models
def test_a_call_running_past_num_steps_is_an_error_not_a_restart():
    model = tiny_dit()
    taylorseer.apply(model, CONFIG, num_steps=8)
    first = loop(model, 8)
    assert torch.equal(loop(model, 8), first)  # the next call (timestep back at 999) restarts the schedule
    with pytest.raises(RuntimeError, match=r"ran past num_steps=8 \(step 8 .*num_steps=N"):
        loop(model, 12)  # the timestep keeps going down at the 9th call: the same call, too long


def test_a_model_without_call_boundaries_starts_a_new_call_when_the_timestep_goes_back():
    # DiT has no diffusers CacheMixin and no num_steps is given: the timestep tells the calls apart.
    model = tiny_dit()
    cache = taylorseer.apply(model, CONFIG)
    assert cache.watch_timesteps
    first = loop(model, 12)
    shorter = loop(model, 5)
    assert torch.equal(loop(model, 12), first)
    assert torch.equal(shorter, first[:5])
    assert [r.step for r in cache.history][-12:] == list(range(12))


def test_last_full_steps_needs_a_step_count():
    model = tiny_dit()
    config = CacheConfig(interval=4, max_order=1, first_enhance=1, last_full_steps=2)
    with pytest.raises(ValueError, match=r"last_full_steps=2 needs the number of sampling steps: pass num_steps"):
        taylorseer.apply(model, config)
    assert taylorseer.get_cache(model) is None
    cache = taylorseer.apply(model, config, num_steps=10)
    loop(model, 10)
    assert [r.step for r in cache.history if r.full] == [0, 4, 8, 9]
    cache.num_steps = None  # a step count lost later is refused too, not ignored
    cache.reset()
    with pytest.raises(ValueError, match="last_full_steps=2 needs the number of sampling steps"):
        loop(model, 1)


def test_diffusers_step_index_drives_the_step_and_a_late_first_step_is_computed():
    model = tiny_dit()
    cache = taylorseer.apply(model, CacheConfig(interval=4, max_order=1, first_enhance=1), num_steps=20)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([1])
    with torch.no_grad():
        for i in range(10, 14):  # a model that joins the loop at step 10 (Wan 2.2's second transformer)
            cache.set_context("cond", step_index=i)
            model(x, t - i, y)
        steps = [(r.step, r.full) for r in cache.history]
        assert steps == [(10, True), (11, False), (12, True), (13, False)]  # 10 has nothing to forecast from
        cache.set_context("cond", step_index=13)
        model(x, t, y)  # a second call at step 13: its own context, never mixed with the first's features
        assert (cache.history[-1].context, cache.history[-1].full) == ("cond+again", True)
        assert cache.context_name == "cond"
        cache.set_context("cond", step_index=0)  # a new call in the same context
        model(x, t, y)
    assert cache.history[-1].step == 0 and cache.history[-1].full


# ------------------------------------------------------------------------------------------------ pipelines
def test_the_pipeline_gives_the_step_count_and_last_full_steps_works(pipes):
    pipe = pipes("pixart")  # PixArt has no diffusers CacheMixin: the pipeline's loop is the only boundary
    cache = taylorseer.apply(pipe, CacheConfig(interval=4, max_order=1, first_enhance=1, last_full_steps=2))
    try:
        tiny.run(pipe, "pixart", 10)
        assert [r.step for r in cache.last_call.history if r.full] == [0, 4, 8, 9]
        tiny.run(pipe, "pixart", 13)
        assert [r.step for r in cache.last_call.history if r.full] == [0, 4, 8, 11, 12]
        assert cache.num_steps == 13
    finally:
        taylorseer.remove(pipe)


def test_an_extra_transformer_call_per_step_gets_its_own_context(pipes):
    # SD3's skip-layer guidance calls the transformer a second time per step (skip_layers=..., batch 1).
    pipe = pipes("sd3")
    slg = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    ref = tiny.run(pipe, "sd3", 6, **slg)
    cache = taylorseer.apply(pipe, CacheConfig(interval=1, max_order=1, first_enhance=2))
    try:
        assert torch.equal(tiny.run(pipe, "sd3", 6, **slg), ref)
        assert {r.context for r in cache.last_call.history} == {"default", "default+skip_layers"}
    finally:
        taylorseer.remove(pipe)
    cache = taylorseer.apply(pipe, CONFIG)
    try:
        out = tiny.run(pipe, "sd3", 6, **slg)
        assert out.shape == ref.shape and not torch.equal(out, ref)  # forecast steps ran, in both contexts
        forecast = {r.context for r in cache.last_call.history if not r.full}
        assert forecast == {"default", "default+skip_layers"}
    finally:
        taylorseer.remove(pipe)


def test_wan_passes_its_step_index_and_each_context_follows_it(pipes):
    pipe = pipes("wan")
    seen = []
    cache = taylorseer.apply(pipe, CONFIG)
    original = cache.set_context

    def spy(name, step_index=None, num_steps=None):
        if name:
            seen.append((name, step_index, num_steps))
        original(name, step_index, num_steps)

    cache.set_context = spy
    try:
        tiny.run(pipe, "wan", 6)
    finally:
        taylorseer.remove(pipe)
    assert seen == [(c, i, 6) for i in range(6) for c in ("cond", "uncond")]


def test_apply_errors_name_the_fix(pipes):
    model = tiny_dit()
    with pytest.raises(TypeError, match="expected a torch.nn.Module or a diffusers pipeline"):
        taylorseer.apply(object(), CONFIG)
    with pytest.raises(ValueError, match=r"no TaylorSeer preset for Mlp.*python -m taylorseer.attach.discover Mlp"):
        taylorseer.apply(model.blocks[0].mlp, CONFIG)
    with pytest.raises(ValueError, match="either a preset or an explicit description"):
        taylorseer.apply(model, CONFIG, preset="dit", modules=["blocks.*.attn"])
    with pytest.raises(ValueError, match=r"'blocks\.0\.mlp' is cached twice"):
        taylorseer.apply(model, CONFIG, modules=["blocks.0.mlp"], blocks={"blocks": taylorseer.presets.get(
            "dit").blocks(model)["blocks.0"]})
    assert taylorseer.get_cache(model) is None and all("forward" not in m.__dict__ for m in model.modules())
    pipe = pipes("cogvideox")
    cache = taylorseer.apply(pipe, CONFIG)
    assert taylorseer.get_cache(pipe) is cache is taylorseer.get_cache(pipe.transformer)
    taylorseer.remove(pipe.transformer)  # removing through the model also restores the pipeline
    assert "progress_bar" not in pipe.__dict__


def test_family_cases_build_for_the_benchmark():
    # Every family's benchmark model runs with the preset and with the bound, on shapes only (on the CPU where its
    # forward reads values: HunyuanVideo 1.5, Lumina2).
    for name in families.NAMES:
        case = families.bench_case(name, "mid", device=families.count_device(name))
        for apply in (families.apply_preset, families.apply_ideal):
            cache = apply(case.model, CONFIG, 50)
            with torch.no_grad():
                report = taylorseer.count_schedule(lambda c=case: c(), cache, 50)
            taylorseer.remove(case.model)
            # HunyuanVideo 1.5 runs its text refiner and byT5 projection on every step: 1/22 of its 4 blocks' FLOPs
            least = 20 if name == "hunyuan_video15" else 50
            assert report.full_step_flops > least * report.forecast_step_flops, name
