"""apply() on transformers no preset serves: each block's path derived from the first step's inputs and verified.

Tiny random models (hidden 32, 2 blocks) of current diffusers families, a 30-step flow loop (tests/tiny_unknown.py).
"""

from __future__ import annotations

import pytest
import tiny_unknown
import torch

import taylorseer
from taylorseer.perf.flops import count_flops

FAMILIES = ["qwenimage", "ltx", "sana", "lumina2", "cogview4", "skyreels", "flux2", "hunyuan15", "hidream"]
# the rest: branch modules (LTX-Video's (B, 1, 6C) temb is read as such since the presets of issue 19)
PATHS = {"skyreels": "derived description", "hunyuan15": "derived description", "ltx": "derived description"}
# A preset serves the class: apply(model) uses it; preset="derive" does not.
PRESETS = {"qwenimage": "qwenimage", "flux2": "flux2", "ltx": "ltx", "hunyuan15": "hunyuan_video15", "sana": "sana",
           "lumina2": "lumina2", "cogview4": "cogview4"}


def _snapshot(model):
    out = {}
    for name, m in model.named_modules():
        out[name] = {k: (len(v), list(v)) if isinstance(v, dict) else (type(v).__name__, id(v))
                     for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
    return out


def _errors(model, call, ref, seeds=(1, 2), preset="derive") -> dict[int, float]:
    """N=5 relative error at order 1 and 0 (FORA), the mean over this model and two more random ones: random
    weights give a direction only, and one draw can go either way (Sana's seed 0 does)."""
    cases = [(model, call, ref)]
    for seed in seeds:
        other, other_call = tiny_unknown.build(FAMILY_OF[id(model)], seed)
        cases.append((other, other_call, tiny_unknown.sample(other, other_call, 30)))
    errors = {1: 0.0, 0: 0.0}
    for m, c, r in cases:
        for order in (1, 0):
            taylorseer.apply(m, taylorseer.CacheConfig(interval=5, max_order=order, first_enhance=2), num_steps=30,
                             preset=preset)
            out = tiny_unknown.sample(m, c, 30)
            taylorseer.remove(m)
            errors[order] += ((out - r).norm() / r.norm()).item() / len(cases)
    return errors


FAMILY_OF: dict[int, str] = {}


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_family_is_exact_at_interval_one_and_forecasts(family):
    model, call = tiny_unknown.build(family)
    FAMILY_OF[id(model)] = family
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = tiny_unknown.sample(model, call, 30)

    taylorseer.apply(model, taylorseer.CacheConfig(interval=1, max_order=1, first_enhance=2), num_steps=30,
                     preset="derive")
    assert torch.equal(tiny_unknown.sample(model, call, 30), ref)
    text = taylorseer.summary(model).describe()
    assert "uncached" not in text and "not yet called" not in text, text
    assert PATHS.get(family, "branch modules") in text, text
    taylorseer.remove(model)

    errors = _errors(model, call, ref)
    assert 0 < errors[1] < errors[0], errors  # closer to uncached than FORA (random weights: direction only)

    assert _snapshot(model) == before  # remove(): every module's __dict__ as it was (no forward, no hook registry)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(tiny_unknown.sample(model, call, 30), ref)


@pytest.mark.parametrize("family,preset", [(f, "derive") for f in FAMILIES] + [(f, "auto") for f in PRESETS])
def test_unknown_family_forecast_step_flops_within_twice_the_bound(family, preset):
    model, call = tiny_unknown.build(family)
    with torch.no_grad():
        full = count_flops(lambda: model(**call(900.0)))
    shares = {}
    for skip_all in (False, True):
        taylorseer.apply(model, taylorseer.CacheConfig(interval=2, max_order=1, first_enhance=1), num_steps=10,
                         skip_all=skip_all, preset=preset)
        with torch.no_grad():
            model(**call(900.0))  # the first step: computed (and verified)
            shares[skip_all] = count_flops(lambda: model(**call(800.0))) / full
        taylorseer.remove(model)
    assert shares[False] <= 2 * shares[True] + 0.02, shares


def test_module_called_twice_per_block_gets_a_feature_per_call():
    model, call = tiny_unknown.build("cogview4")
    taylorseer.apply(model, taylorseer.CacheConfig(interval=2, max_order=1, first_enhance=1), num_steps=10,
                     preset="derive")
    with torch.no_grad():
        model(**call(900.0))
    summary = taylorseer.summary(model)
    assert "ff (2x)" in summary.describe()
    cache = taylorseer.get_cache(model)
    assert {"transformer_blocks.0.ff#0", "transformer_blocks.0.ff#1"} <= set(cache._ctx.states)
    taylorseer.remove(model)


def test_a_block_that_fails_both_checks_runs_uncached_and_says_so():
    class Block(torch.nn.Module):  # its output depends on more than its branches: nothing verifies
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(8, 8)
            self.ff = torch.nn.Linear(8, 8)

        def forward(self, hidden_states):
            return hidden_states + self.ff(self.attn(hidden_states)) + torch.rand_like(hidden_states)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, t):
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(1, 4, 8)
    taylorseer.apply(model, taylorseer.CacheConfig(interval=2, max_order=0, first_enhance=1), num_steps=3)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"blocks\.0 \(blocks \(Block\)\): uncached"):
        outs = [model(x, torch.tensor(float(t))) for t in range(3)]
    text = taylorseer.summary(model).describe()
    assert "2 x blocks (Block): uncached (derived description:" in text and "branch modules: " in text, text
    assert taylorseer.summary(model).keys == [] and all(o.shape == x.shape for o in outs)
    taylorseer.remove(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_adaptive_schedule_on_a_derived_model_sees_one_probe_output_per_step():
    model, call = tiny_unknown.build("skyreels")
    seen = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(1))
    taylorseer.apply(model, taylorseer.CacheConfig(schedule="adaptive", threshold=0.05), num_steps=6)
    try:
        with torch.no_grad():
            for i in range(6):
                model(**call(1000.0 - 150 * i))
    finally:
        taylorseer.remove(model)
    assert len(seen) == 6  # the verifier's trace of the first call is no call of the block for anyone else


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_preset_is_exact_at_interval_one_and_forecasts(family):
    model, call = tiny_unknown.build(family)
    FAMILY_OF[id(model)] = family
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = tiny_unknown.sample(model, call, 30)
    taylorseer.apply(model, taylorseer.CacheConfig(interval=1, max_order=1, first_enhance=2), num_steps=30)
    assert taylorseer.summary(model).preset == PRESETS[family]
    assert torch.equal(tiny_unknown.sample(model, call, 30), ref)
    taylorseer.remove(model)
    errors = _errors(model, call, ref, preset="auto")
    assert 0 < errors[1] < errors[0], errors
    assert _snapshot(model) == before  # remove(): every module's __dict__ as it was
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(tiny_unknown.sample(model, call, 30), ref)


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_preset_forecast_of_order_zero_reproduces_the_full_step(family):
    """The hand-written description checked as ``derive`` checks its own: the same inputs twice at interval 2,
    order 0, so the forecast step's features are the full step's: the output must be the same to float rounding,
    collapsed and per block."""
    model, call = tiny_unknown.build(family)
    kwargs = call(500.0)
    with torch.no_grad():
        real = model(**kwargs)[0]
    for step in ("collapsed", "per_block"):
        cache = taylorseer.apply(model, taylorseer.CacheConfig(interval=2, max_order=0, first_enhance=1,
                                                               forecast_step=step), num_steps=4)
        with torch.no_grad():
            full, forecast = model(**kwargs)[0], model(**kwargs)[0]
        heads = cache.collapser.heads if cache.collapser is not None else 0
        taylorseer.remove(model)
        assert [r.full for r in cache.last_call.history] == [True, False]
        assert torch.equal(full, real)
        assert (forecast - real).abs().max() <= 1e-5 * real.abs().max(), step
        assert heads == (step == "collapsed")  # one run: every collapsible block in it


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_preset_collapsed_equals_per_block(family):
    model, call = tiny_unknown.build(family)
    ref = tiny_unknown.sample(model, call, 12)
    outs, runs = {}, {}
    for step in ("per_block", "collapsed"):
        cache = taylorseer.apply(model, taylorseer.CacheConfig(interval=3, max_order=1, first_enhance=1,
                                                               forecast_step=step), num_steps=12)
        outs[step] = tiny_unknown.sample(model, call, 12)
        runs[step] = cache.collapser.heads if cache.collapser is not None else 0
        taylorseer.remove(model)
    assert (outs["per_block"] - ref).abs().max() > 1e-4 * ref.abs().max()  # forecasts happened
    assert (outs["collapsed"] - outs["per_block"]).abs().max() <= 1e-6 * outs["per_block"].abs().max()
    assert runs["collapsed"] > 0 and runs["per_block"] == 0
