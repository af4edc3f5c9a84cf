"""Forecast values on polynomial feature trajectories, through the real hooks and cache.

A module whose output is a polynomial f(s) of the step s lets us check every forecast against the
closed form that docs/method.md's update rule gives.
"""

import pytest
import torch
from step_model import StepFeature

import taylorseer
from taylorseer import CacheConfig


def run(f, config, num_steps=20):
    model = StepFeature(f)
    taylorseer.apply(model, config, modules=["branch"], num_steps=num_steps)
    outs = [model(torch.zeros(3), torch.tensor(float(s)))[0].item() for s in range(num_steps)]
    return outs, model


def test_order_one_forecasts_a_linear_sequence_exactly():
    # Exact from the second full step on (the first derivative needs two); before it, reuse.
    f = lambda s: 3.0 * s - 7.0  # noqa: E731
    for interval, warmup in [(3, 2), (4, 2), (6, 3), (5, 1)]:
        outs, model = run(f, CacheConfig(interval=interval, max_order=1, first_enhance=warmup))
        full = taylorseer.full_steps(20, CacheConfig(interval=interval, first_enhance=warmup))
        assert outs[full[1]:] == [f(s) for s in range(full[1], 20)]
        assert outs[: full[1]] == [f(0)] * full[1]
        assert len(model.branch.steps) == len(full)


def test_order_zero_is_reuse():
    f = lambda s: s * s  # noqa: E731
    outs, _ = run(f, CacheConfig(interval=4, max_order=0, first_enhance=2))
    full = taylorseer.full_steps(20, CacheConfig(interval=4, first_enhance=2))
    last = {s: max(x for x in full if x <= s) for s in range(20)}
    assert outs == [f(last[s]) for s in range(20)]


def test_order_two_on_a_quadratic_matches_the_upstream_closed_form():
    # Upstream backward differences with full steps h apart: D1 = f(s) - f(s-h) over h = 2s - h and
    # D2 = 2, so the forecast at s + k is f(s + k) - h * k (bias -h f'' k / 2). The first forecasts
    # after the warm-up mix step distances 1 and N (the update uses only the latest distance).
    f = lambda s: float(s * s)  # noqa: E731
    outs, _ = run(f, CacheConfig(interval=3, max_order=2, first_enhance=2))
    # full steps 0, 1, 4, 7, 10, ...: at 1: D1 = 1; at 4: D1 = 5, D2 = (5 - 1)/3 = 4/3.
    assert outs[:5] == [0.0, 1.0, 1.0 + 1.0, 1.0 + 2.0, 16.0]
    assert outs[5] == pytest.approx(16 + 5 + (4 / 3) / 2, abs=1e-5)
    assert outs[6] == pytest.approx(16 + 5 * 2 + (4 / 3) * 4 / 2, abs=1e-5)
    # From step 7 on both derivatives come from 3-apart full steps: f(s + k) - 3k exactly.
    for s in range(7, 19, 3):
        for k in (1, 2):
            assert outs[s + k] == pytest.approx(f(s + k) - 3 * k, abs=1e-4)


def test_higher_orders_keep_a_linear_sequence_exact():
    # Warm-up 1 (HunyuanVideo): full steps 0, 4, 8, ...; steps 1-3 reuse step 0, then the
    # higher differences of a linear sequence are 0 and every order stays exact.
    f = lambda s: 0.5 * s - 2.0  # noqa: E731
    outs, _ = run(f, CacheConfig(interval=4, max_order=3, first_enhance=1))
    assert outs[:4] == [f(0)] * 4
    assert outs[4:] == pytest.approx([f(s) for s in range(4, 20)], abs=1e-5)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_newton_forecaster_is_exact_on_polynomials_of_its_order(degree):
    coeffs = [1.5, -0.75, 0.125, 0.03125][: degree + 1]
    f = lambda s: sum(c * s**i for i, c in enumerate(coeffs))  # noqa: E731
    config = CacheConfig(interval=3, max_order=degree, first_enhance=2, forecaster="newton")
    outs, _ = run(f, config)
    # Exact once degree + 1 full steps are known, whatever their spacing (1 apart, then 3 apart).
    start = taylorseer.full_steps(20, config)[degree]
    assert outs[start:] == pytest.approx([f(s) for s in range(start, 20)], rel=1e-5, abs=1e-4)


def test_timestep_distance_is_scale_free():
    # Taylor in real timesteps: a trajectory linear in t is forecast exactly for any spacing of t.
    ts = [1000 - 37.0 * s - 0.5 * s * s for s in range(20)]
    model = StepFeature(lambda t: 2.0 * t + 1.0)
    taylorseer.apply(model, CacheConfig(interval=4, max_order=1, first_enhance=2, step_distance="timestep"),
                     modules=["branch"], num_steps=20)
    outs = [model(torch.zeros(2), torch.tensor(t))[0].item() for t in ts]
    assert outs == pytest.approx([2.0 * t + 1.0 for t in ts], rel=1e-6)


def test_factors_are_owned_buffers_and_counted():
    # The model's own output tensors are never written to by the cache (it keeps copies).
    model = StepFeature(lambda s: float(s))
    cache = taylorseer.apply(model, CacheConfig(interval=2, max_order=2, first_enhance=1), modules=["branch"],
                             num_steps=10)
    kept = [model(torch.zeros(5), torch.tensor(float(s))) for s in range(10)]
    assert [k[0].item() for k in kept[::2]] == [0.0, 2.0, 4.0, 6.0, 8.0]  # full-step outputs unchanged
    assert cache.nbytes() == 3 * 5 * 4  # O+1 factors of 5 float32 values


@pytest.mark.parametrize("forecaster", ["taylor", "newton"])
def test_weighted_terms_and_gated_add_equal_the_forecast(forecaster):
    from taylorseer.core.kernels import gated_add

    model = StepFeature(lambda s: 0.1 * s**3 - s)
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=2, first_enhance=2, forecaster=forecaster),
                             modules=["branch"], num_steps=20)
    for s in range(9):  # ends on step 8, a forecast step (full: 0, 1, 4, 7)
        model(torch.zeros(4), torch.tensor(float(s)))
    assert not cache.is_full
    (terms,) = cache.terms("branch")
    assert len(terms) == 3
    forecast = cache.forecast("branch")
    assert torch.allclose(sum(w * f for w, f in terms), forecast)
    residual, gate = torch.randn(4), torch.randn(4)
    assert torch.allclose(gated_add(residual, gate, terms), residual + gate * forecast, atol=1e-6)
