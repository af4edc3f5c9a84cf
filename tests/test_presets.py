"""FLUX, HunyuanVideo and DiT as presets of the block descriptions: the same outputs bit for bit and the same
ops on a forecast step as the hand-written attachments they replaced (tests/reference_attachments.py).

Ops are counted with a TorchDispatchMode (taylorseer.perf.opcount): every aten op of one forecast call, by name.
"""

from __future__ import annotations

import functools

import pytest
import reference_attachments as ref
import torch

import taylorseer
from taylorseer import CacheConfig, presets
from taylorseer.attach import families, tiny
from taylorseer.perf.opcount import count_ops

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 30


def _sample(model, inputs: dict, steps: int, count_at: int | None = None, key: str = "hidden_states",
            timestep_scale: float = 1.0):
    """A flow-matching Euler loop over the model's own outputs; the ops of call ``count_at`` are counted."""
    x, ops = inputs[key].clone(), None
    for i in range(steps):
        call = {**inputs, key: x, "timestep": torch.full((x.shape[0],), (1 - i / steps) * timestep_scale)}
        out = []
        with torch.no_grad():
            if i == count_at:
                ops = count_ops(functools.partial(_append, out, model, call))
            else:
                _append(out, model, call)
        x = x - out[0] / steps
    return x, ops


def _append(out: list, model, call: dict) -> None:
    out.append(model(**call)[0])


@pytest.fixture(scope="module")
def flux():
    case = families.bench_case("flux", "smoke", batch=2)
    return case.model, case.inputs


@pytest.fixture(scope="module")
def hunyuan():
    case = families.bench_case("hunyuan_video", "smoke")
    return case.model, case.inputs


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("forecast_text", [False, True])
def test_flux_preset_equals_the_hand_written_attachment(flux, order, forecast_text):
    model, inputs = flux
    config = CacheConfig(interval=6, max_order=order, first_enhance=3, forecast_step="per_block")  # the oracle
    # full steps 0, 1, 2, 8, 14, 20, 26: step 21 forecasts from the most factors
    ref.apply_flux(model, config, STEPS, forecast_text=forecast_text)
    expected, expected_ops = _sample(model, inputs, STEPS, count_at=21)
    reference_held = taylorseer.get_cache(model).nbytes()
    taylorseer.remove(model)
    from taylorseer_flux.cache import attach_cache

    cache = attach_cache(model, config, STEPS, forecast_text=forecast_text)
    out, ops = _sample(model, inputs, STEPS, count_at=21)
    assert [r.step for r in cache.history if r.full] == [0, 1, 2, 8, 14, 20, 26]
    held = cache.nbytes()
    taylorseer.remove(model)
    assert torch.equal(out, expected)
    assert ops.counts == expected_ops.counts and ops.total > 20 * order
    # The double blocks' attention text output is no longer stored where no forecast step reads it.
    if forecast_text:
        assert held == reference_held
    else:
        text = inputs["encoder_hidden_states"]
        per_factor = text.shape[0] * text.shape[1] * model.inner_dim * 4
        assert reference_held - held == len(model.transformer_blocks) * (order + 1) * per_factor > 0


def test_generic_apply_on_flux_is_the_dedicated_attachment(flux):
    """``taylorseer.apply(transformer, config)`` finds the flux preset: the outputs and ops of attach_cache."""
    model, inputs = flux
    config = CacheConfig(interval=6, max_order=1, first_enhance=3, forecast_step="per_block")  # the oracle
    ref.apply_flux(model, config, STEPS)
    expected, expected_ops = _sample(model, inputs, STEPS, count_at=10)
    taylorseer.remove(model)
    cache = taylorseer.apply(model, config, num_steps=STEPS)
    out, ops = _sample(model, inputs, STEPS, count_at=10)
    summary = taylorseer.summary(model)
    assert cache.full_step_count == 7
    taylorseer.remove(model)
    assert summary.preset == "flux" and len(summary.short_blocks) == 4  # 2 double + 2 single blocks
    assert torch.equal(out, expected) and ops.counts == expected_ops.counts


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("single_attention", [True, False])
def test_hunyuan_video_preset_equals_the_hand_written_attachment(hunyuan, order, single_attention):
    from taylorseer_hunyuan_video.cache import attach_cache

    model, inputs = hunyuan
    config = CacheConfig(interval=5, max_order=order, first_enhance=1, forecast_step="per_block")  # the oracle
    ref.apply_hunyuan(model, config, STEPS, single_attention=single_attention)
    expected, expected_ops = _sample(model, inputs, STEPS, count_at=16, timestep_scale=1000)
    expected_bytes = taylorseer.get_cache(model).nbytes()
    taylorseer.remove(model)
    cache = attach_cache(model, config, STEPS, single_attention=single_attention)
    out, ops = _sample(model, inputs, STEPS, count_at=16, timestep_scale=1000)
    assert [r.step for r in cache.history if r.full] == list(range(0, STEPS, 5))
    assert cache.nbytes() == expected_bytes > 0
    taylorseer.remove(model)
    assert torch.equal(out, expected)
    assert ops.counts == expected_ops.counts


def test_hunyuan_video_lean_option_is_close_and_cheaper(hunyuan):
    """``lean=True`` (short double blocks, no text forecast): same video up to float rounding, fewer ops and bytes."""
    model, inputs = hunyuan
    config = CacheConfig(interval=5, max_order=1, first_enhance=1, forecast_step="per_block")
    results = {}
    for lean in (False, True):
        taylorseer.apply(model, config, preset=presets.get("hunyuan_video", lean=lean), num_steps=STEPS)
        results[lean] = _sample(model, inputs, STEPS, count_at=16, timestep_scale=1000)
        taylorseer.remove(model)
    reference, _ = _sample(model, inputs, STEPS, timestep_scale=1000)
    (default, default_ops), (lean, lean_ops) = results[False], results[True]
    assert (default - reference).abs().max() > 1e-4  # forecasts happened
    torch.testing.assert_close(lean, default, rtol=1e-5, atol=1e-5)
    assert lean_ops.kernels < default_ops.kernels and lean_ops.bytes < default_ops.bytes / 1.5


@pytest.mark.parametrize("order", [1, 3])
def test_dit_preset_equals_the_hand_written_attachment(order):
    from taylorseer_dit.cache import attach_cache
    from taylorseer_dit.diffusion import GaussianDiffusion
    from taylorseer_dit.models import DiT_models
    from taylorseer_dit.pipeline import sample

    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10).eval()
    model.initialize_weights(zero_init=False)
    diffusion = GaussianDiffusion(20, "ddim")
    config = CacheConfig(interval=4, max_order=order, first_enhance=2, forecast_step="per_block")  # the oracle
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])

    def run(attach):
        cache = attach_cache(model, config, 20)
        out = sample(model, diffusion, torch.tensor([1, 4]), cfg_scale=1.5, seed=5)
        held = cache.last_call.nbytes if cache.last_call else cache.nbytes()
        cache.reset(num_steps=20)
        with torch.no_grad():
            for _ in range(10):  # full steps 0, 1, 5, 9: the 11th call forecasts from 4 factors
                model(x, t, y)
            ops = count_ops(lambda: model(x, t, y))
        taylorseer.remove(model)
        return out, held, ops

    expected, expected_held, expected_ops = run(ref.apply_dit)
    out, held, ops = run(attach_cache)
    assert torch.equal(out, expected) and held == expected_held > 0
    assert ops.counts == expected_ops.counts


def test_every_family_has_a_preset_found_from_its_class():
    for name in families.NAMES:
        model = families.build(name, "smoke", device="meta")
        found = presets.find(model)
        assert found is not None and found.name == name, name
    # the small instances of discovery (attach.tiny) of the same classes -> the same presets
    extra = {"qwenimage": "qwenimage", "flux2": "flux2", "ltx": "ltx", "hunyuan15": "hunyuan_video15", "sana": "sana",
             "lumina2": "lumina2", "cogview4": "cogview4"}
    for tiny_name, name in extra.items():
        assert presets.find(tiny.build(tiny_name)[0]).name == name
    assert set(presets.NAMES) == set(families.NAMES) | {"dit"}  # every diffusers preset has a benchmark model


def test_wan_preset_on_wan22_ti2v_per_token_timesteps():
    """Wan 2.2 TI2V passes one timestep per token (the first frame's tokens at 0): ``temb`` is (B, S, 6, C) and
    the wan preset's gates are per token; the collapsed step runs such blocks per block (the same ops)."""
    case = families.bench_case("wan", "smoke")
    model, inputs = case.model, case.inputs
    tokens = 8  # (2 frames, 4 x 4) latents, patch (1, 2, 2)

    def timestep(t):
        per_token = torch.full((1, tokens), t)
        per_token[:, :tokens // 2] = 0.0  # the conditioning frame
        return per_token

    def loop(steps=12):
        x = inputs["hidden_states"].clone()
        for i in range(steps):
            with torch.no_grad():
                v = model(**{**inputs, "hidden_states": x, "timestep": timestep(1000.0 * (1 - i / steps))})[0]
            x = x - v / steps
        return x

    ref = loop()
    with torch.no_grad():
        real = model(**{**inputs, "timestep": timestep(500.0)})[0]
    outs = {}
    for step in ("per_block", "collapsed"):
        cache = taylorseer.apply(model, CacheConfig(interval=2, max_order=0, first_enhance=1, forecast_step=step),
                                 num_steps=2)
        with torch.no_grad():
            model(**{**inputs, "timestep": timestep(500.0)})
            forecast = model(**{**inputs, "timestep": timestep(500.0)})[0]
        taylorseer.remove(model)
        assert (forecast - real).abs().max() <= 1e-5 * real.abs().max()  # the per-token gates are the block's
        cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=1, forecast_step=step),
                                 num_steps=12)
        outs[step] = loop()
        heads = cache.collapser.heads if cache.collapser is not None else 0
        taylorseer.remove(model)
        assert heads == 0  # per-token gates: per block under the collapsed step too
    assert torch.equal(outs["collapsed"], outs["per_block"]) and not torch.equal(outs["per_block"], ref)
    taylorseer.apply(model, CacheConfig(interval=1, max_order=1, first_enhance=1), num_steps=12)
    assert torch.equal(loop(), ref)
    taylorseer.remove(model)
