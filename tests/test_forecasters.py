"""The forecasters beside Taylor and Newton: exact where their equations say, closed forms on quadratics,
and the weighted-terms form the fused gated add reads."""

import pytest
import torch
from step_model import StepFeature

import taylorseer
from taylorseer import CacheConfig
from taylorseer.core.forecast import scaled_hermite


def run(f, config, num_steps=21):
    model = StepFeature(f)
    taylorseer.apply(model, config, modules=["branch"], num_steps=num_steps)
    return [model(torch.zeros(3, dtype=torch.float64), torch.tensor(float(s)))[0].item() for s in range(num_steps)]


def test_scaled_hermite_polynomials():
    x, s = 1.7, 0.6
    assert scaled_hermite(0, x, s) == 1.0 and scaled_hermite(1, x, s) == x
    assert scaled_hermite(2, x, s) == pytest.approx(x**2 - s**2)
    assert scaled_hermite(3, x, s) == pytest.approx(x**3 - 3 * s**2 * x)
    assert scaled_hermite(4, x, s) == pytest.approx(x**4 - 6 * s**2 * x**2 + 3 * s**4)
    assert [scaled_hermite(n, x, 0.0) for n in range(5)] == pytest.approx([x**n for n in range(5)])


@pytest.mark.parametrize("forecaster", ["hermite", "feedback"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_exact_on_lines_for_every_order(forecaster, order):
    f = lambda s: 0.75 * s - 4.0  # noqa: E731
    config = CacheConfig(interval=3, max_order=order, first_enhance=1, forecaster=forecaster)
    outs = run(f, config)
    assert outs[3:] == pytest.approx([f(s) for s in range(3, 21)], abs=1e-9)  # from the second full step


def test_feedback_order_one_on_a_quadratic_is_exact_at_the_next_full_step():
    # Full steps 0, 3, 6, ...: from step 6 on the residual of the previous prediction (2 h^2 f''/2 = 18) is
    # carried forward, and the forecast at s + k is f(s + k) + k (k - 3); Taylor O=1 alone gives -k (k + 3).
    f = lambda s: float(s * s)  # noqa: E731
    outs = run(f, CacheConfig(interval=3, max_order=1, first_enhance=1, forecaster="feedback"))
    taylor = run(f, CacheConfig(interval=3, max_order=1, first_enhance=1))
    for s in range(6, 19, 3):
        for k in (1, 2):
            assert outs[s + k] == pytest.approx(f(s + k) + k * (k - 3), abs=1e-9)
            assert taylor[s + k] == pytest.approx(f(s + k) - k * (k + 3), abs=1e-9)


def test_hermite_order_two_on_a_quadratic_is_the_damped_upstream_forecast():
    # Upstream O=2 with gaps h = 3 gives f(s + k) - h k (f'' = 2); the Hermite basis subtracts s^2 D2 / 2 with
    # s = h / 2 = 1.5 and D2 = 2: 2.25 less.
    f = lambda s: float(s * s)  # noqa: E731
    outs = run(f, CacheConfig(interval=3, max_order=2, first_enhance=1, forecaster="hermite"))
    for s in range(6, 19, 3):
        for k in (1, 2):
            assert outs[s + k] == pytest.approx(f(s + k) - 3 * k - 2.25, abs=1e-9)


@pytest.mark.parametrize("forecaster", ["hermite", "feedback"])
def test_weighted_terms_and_gated_add_equal_the_forecast(forecaster):
    from taylorseer.core.kernels import gated_add

    model = StepFeature(lambda s: 0.1 * s**3 - s)
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=2, first_enhance=2, forecaster=forecaster),
                             modules=["branch"], num_steps=20)
    for s in range(12):  # ends on step 11, a forecast step (full: 0, 1, 4, 7, 10)
        model(torch.zeros(4), torch.tensor(float(s)))
    assert not cache.is_full
    (terms,) = cache.terms("branch")
    assert len(terms) == (4 if forecaster == "feedback" else 3)  # feedback keeps the residual as one more factor
    assert all(isinstance(w, float) for w, _ in terms)
    forecast = cache.forecast("branch")
    assert torch.allclose(sum(w * f for w, f in terms), forecast)
    residual, gate = torch.randn(4), torch.randn(4)
    assert torch.allclose(gated_add(residual, gate, terms), residual + gate * forecast, atol=1e-5)
    assert cache.nbytes() == len(terms) * 4 * 4


def test_feedback_residual_is_dropped_by_the_warm_up_and_reset():
    model = StepFeature(lambda s: float(s * s))
    cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=1, forecaster="feedback"),
                             modules=["branch"], num_steps=10)
    outs = [[model(torch.zeros(1, dtype=torch.float64), torch.tensor(float(s)))[0].item() for s in range(10)]
            for _ in range(2)]
    assert outs[0] == outs[1]  # the second call starts from nothing, like the first
    assert len(cache._ctx.states["branch"][0].tensors) == 3
