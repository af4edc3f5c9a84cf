"""The 8-bit factor store (``cache.factor_store``): quantisation bounds, exact derivative updates, forecasts
and gated adds from 8-bit factors, bytes counted exactly (scales included), the tag, the default untouched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from step_model import StepFeature as Trajectory

import taylorseer
from taylorseer import CacheConfig
from taylorseer.core.forecast import combine
from taylorseer.core.kernels import count_traffic, forecast_kernel, gated_add
from taylorseer.core.store import dense, quantize, stored_nbytes

pytestmark = pytest.mark.usefixtures("one_thread")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA = {E4M3: 3, E5M2: 2}


def error_bound(x: torch.Tensor, scale: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """Round-to-nearest in ``fmt`` on x / scale: half a unit in the last place of a normal number
    (2^-(m+1) relative), or half the subnormal spacing below the smallest normal, times the scale."""
    m = MANTISSA[fmt]
    tiny = torch.finfo(fmt).smallest_normal
    return torch.maximum(x.abs() * 2.0 ** -(m + 1), scale * tiny * 2.0 ** -(m + 1)) * (1 + 1e-5) + 1e-7 * x.abs()


# --------------------------------------------------------------------------------------------- quantise
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantisation_error_is_within_the_format_bound(fmt, axis):
    g = torch.Generator().manual_seed(0)
    # Tokens and channels of very different magnitudes (1e-3 .. 1e3), as real features have.
    x = torch.randn(2, 50, 64, generator=g) * torch.exp(torch.randn(2, 50, 1, generator=g) * 2)
    x = x * torch.exp(torch.randn(1, 1, 64, generator=g))
    f = quantize(x, fmt, axis, torch.float32)
    assert f.data.dtype == fmt and f.scale.dtype == torch.float32
    assert f.scale.shape == ((2, 50, 1) if axis == "token" else (2, 1, 64))
    deq = f.dequantize()
    assert (deq - x).abs().le(error_bound(x, f.scale, fmt)).all()
    # Each scale maps its amax onto the format's largest value: the full range is used.
    assert f.data.to(torch.float32).abs().amax() == torch.finfo(fmt).max


def test_e4m3_per_token_rms_error_on_a_gaussian():
    x = torch.randn(4, 1000, 128, generator=torch.Generator().manual_seed(1))
    rel = {fmt: ((quantize(x, fmt, "token", torch.float32).dequantize() - x).norm() / x.norm()).item()
           for fmt in (E4M3, E5M2)}
    assert 0.02 < rel[E4M3] < 0.03  # measured 0.0251: 3 mantissa bits
    assert 0.04 < rel[E5M2] < 0.06  # measured 0.0501: 2 mantissa bits


def test_zero_tokens_and_the_largest_values_stay_finite():
    x = torch.zeros(1, 3, 8)
    x[0, 1] = torch.tensor([3e38, -3e38, 1.0, 0, 0, 0, 0, 0])  # near fp32's max
    for fmt in (E4M3, E5M2):
        deq = quantize(x, fmt, "token", torch.float32).dequantize()
        assert torch.isfinite(deq).all() and deq[0, 0].eq(0).all() and deq[0, 2].eq(0).all()
        assert deq[0, 1, 0] == pytest.approx(3e38, rel=1e-6)


def test_dequantize_in_bf16_rounds_once():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    f = quantize(x, E4M3, "token", torch.bfloat16)
    assert f.dequantize().dtype == torch.bfloat16
    assert torch.equal(f.dequantize(), (f.data.float() * f.scale).bfloat16())


# --------------------------------------------------------------------------------------- ScaledFactor
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_a_scaled_factor_slices_like_its_dense_value(axis):
    # HunyuanVideo's single blocks split a stored factor into video and text tokens.
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(3))
    f = quantize(x, E4M3, axis, torch.float32)
    for index in [(slice(None), slice(None, 6)), (slice(None), slice(6, None)), (0,), (slice(None), 3)]:
        part = f[index]
        assert torch.equal(part.dequantize(), f.dequantize()[index])
        assert part.data.data_ptr() == f.data[index].data_ptr()  # a view, no copy
        assert part.scale.numel() <= f.scale.numel()  # the scale is not broadcast to the tokens' size


def test_torch_functions_see_the_dense_value():
    # Code written for dense factors (the addcmul chain, a residual add) stays correct with 8-bit ones.
    g = torch.Generator().manual_seed(4)
    r, gate = torch.randn(2, 4, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    f = quantize(torch.randn(2, 4, 8, generator=g), E4M3, "token", torch.float32)
    d = f.dequantize()
    assert torch.equal(torch.add(r, f, alpha=0.5), torch.add(r, d, alpha=0.5))
    assert torch.equal(torch.addcmul(r, gate, f, value=2.0), torch.addcmul(r, gate, d, value=2.0))
    out = r.clone()
    out.add_(f, alpha=3.0)
    assert torch.equal(out, torch.add(r, d, alpha=3.0))
    assert torch.equal(dense(f), d) and dense(d) is d


def test_bytes_of_a_scaled_factor_count_data_and_scales():
    x = torch.randn(2, 7, 12)
    assert quantize(x, E4M3, "token", torch.float32).nbytes == 2 * 7 * 12 + 2 * 7 * 4
    assert quantize(x, E4M3, "channel", torch.float32).nbytes == 2 * 7 * 12 + 2 * 12 * 4
    assert stored_nbytes((2, 7, 12), 3, "float8", "token") == 3 * (168 + 56)
    assert stored_nbytes((2, 7, 12), 3, "float8", "channel") == 3 * (168 + 96)
    assert stored_nbytes((2, 7, 12), 3, "dense", dtype=torch.bfloat16) == 3 * 168 * 2


# ------------------------------------------------------------------------------------------- gated add
def _terms(order, axis, dtype, g, shape=(2, 600, 256)):
    dense_factors = [torch.randn(*shape, generator=g) * 0.5 ** i for i in range(order + 1)]
    weights = [1.0, 2.5, 3.125, -0.75][: order + 1]
    factors = [quantize(f, E4M3 if i == 0 else E5M2, axis, dtype) for i, f in enumerate(dense_factors)]
    return list(zip(weights, factors, strict=True))


@pytest.mark.parametrize("kernel", ["addcmul", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_add_with_8bit_factors_equals_the_dequantised_sum(kernel, dtype):
    g = torch.Generator().manual_seed(5)
    residual = torch.randn(2, 600, 256, generator=g).to(dtype)
    gate = torch.randn(2, 1, 256, generator=g).to(dtype)
    for order, axis in [(0, "token"), (1, "token"), (2, "channel")]:
        terms = _terms(order, axis, dtype, g)
        # the reference in fp64 from the dequantised factors
        exact = residual.double() + gate.double() * sum(w * f.dequantize(torch.float64) for w, f in terms)
        with warnings.catch_warnings(), forecast_kernel(kernel), count_traffic() as records:
            warnings.simplefilter("error")  # a fused kernel that fell back to the chain would warn
            out = gated_add(residual, gate, terms)
            into = gated_add(residual, gate, terms, out=residual.clone())
        assert [r.kernel for r in records] == [kernel, kernel]
        assert out.dtype == dtype and into.dtype == dtype
        # Relative to the magnitude of the terms: in bf16 (unit roundoff 2^-8) the fused kernel rounds once, the
        # chain each dequantised factor and each partial sum (2 (O + 1) roundings); fp32 to float rounding.
        size = residual.double().abs() + gate.double().abs() * sum(abs(w) * f.dequantize(torch.float64).abs()
                                                                    for w, f in terms)
        rounding = 2 ** -8 if kernel == "inductor" else 2 * (order + 1) * 2 ** -8
        tol = 1e-6 if dtype == torch.float32 else rounding * 1.01
        for got in (out, into):
            assert ((got.double() - exact).abs() / size).max() < tol
        # What a pass reads of an 8-bit factor: 1 byte per element plus its scales, never a dense copy.
        acc = residual.numel() * residual.element_size()
        scales = sum(f.scale.numel() * 4 for _, f in terms)
        if kernel == "inductor":
            assert records[0].bytes_moved == 2 * acc + gate.nbytes + residual.numel() * (order + 1) + scales


def test_8bit_gated_add_moves_fewer_bytes_than_dense_fp32_with_the_fused_kernel():
    g = torch.Generator().manual_seed(6)
    residual, gate = torch.randn(2, 600, 256, generator=g), torch.randn(2, 1, 256, generator=g)
    terms = _terms(1, "token", torch.float32, g)
    dense_terms = [(w, f.dequantize()) for w, f in terms]
    with forecast_kernel("inductor"), count_traffic() as records:
        gated_add(residual, gate, dense_terms)
        gated_add(residual, gate, terms)
    dense_bytes, f8_bytes = records[0].bytes_moved, records[1].bytes_moved
    n = residual.numel()
    assert dense_bytes - f8_bytes == 2 * (n * 4) - (2 * n + 2 * 2 * 600 * 4)  # two factors: 4 -> 1 byte + scales


# ----------------------------------------------------------------------------- through the real cache
def _run(f, config, steps=16):
    model = Trajectory(f)
    cache = taylorseer.apply(model, config, modules=["branch"], num_steps=steps)
    # clone: an order-0 forecast is the stored buffer itself, valid until the module's next full step
    return [model(torch.zeros(()), torch.tensor(float(s))).clone() for s in range(steps)], cache


def _representable(axis):
    """v with entries +-2^-k (k = 0..3) and a +-1 in every token and every channel: v * c / amax * fp8_max is
    an exact fp8 value for any c > 0 in both formats (448 * 2^-k, 57344 * 2^-k)."""
    g = torch.Generator().manual_seed(7)
    v = torch.pow(2.0, -torch.randint(0, 4, (2, 6, 6), generator=g).float())
    v = v * torch.where(torch.rand(2, 6, 6, generator=g) < 0.5, -1.0, 1.0)
    idx = torch.arange(6)
    v[:, idx, idx] = torch.where(v[:, idx, idx] < 0, -1.0, 1.0)
    return v


@pytest.mark.parametrize("store", ["float8", "float8_e5m2"])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("order,forecaster", [(1, "taylor"), (2, "taylor"), (2, "newton")])
def test_a_linear_sequence_of_fp8_values_is_forecast_exactly(store, axis, order, forecaster):
    # F(s) = v (s + 1): every factor (F, its first difference v, higher differences 0) is an fp8 value times
    # its scale, so a correct update (differences of dequantised values, scales per factor, weights on the
    # right factors) forecasts exactly, to fp32 rounding. Any slip in the update shows here.
    v = _representable(axis)
    f = lambda s: v * (s + 1)  # noqa: E731
    config = CacheConfig(interval=4, max_order=order, first_enhance=1, factor_store=store, factor_scale=axis,
                         forecaster=forecaster)
    outs, cache = _run(f, config)
    for s, out in enumerate(outs[4:], start=4):
        torch.testing.assert_close(out, f(s), rtol=2e-6, atol=1e-6)
    # ... while features that are not fp8 values do show the quantisation (the store is really 8-bit).
    noisy = lambda s: v * (s + 1) + 0.01 * torch.sin(torch.arange(72.0).view(2, 6, 6) * (s + 1))  # noqa: E731
    outs, _ = _run(noisy, config)
    assert max((o - noisy(s)).abs().max().item() for s, o in enumerate(outs[4:], start=4)) > 1e-4


@pytest.mark.parametrize("store,axis", [("float8", "token"), ("float8_e5m2", "channel")])
def test_updates_store_each_difference_within_the_bound_and_forecasts_combine_the_stored_factors(store, axis):
    """On random smooth trajectories: at every full step each stored factor is within the format's bound of
    (new value - dequantised old factor) / d, computed here independently; every forecast equals the
    Taylor sum of the dequantised stored factors."""
    g = torch.Generator().manual_seed(8)
    a, b, c = (torch.randn(2, 40, 32, generator=g) for _ in range(3))
    f = lambda s: a + 0.3 * s * b + 0.02 * s * s * c  # noqa: E731
    config = CacheConfig(interval=3, max_order=2, first_enhance=2, factor_store=store, factor_scale=axis)
    model = Trajectory(f)
    cache = taylorseer.apply(model, config, modules=["branch"], num_steps=14)
    previous, last_full = None, None
    fmt_diff = E4M3 if store == "float8" else E5M2
    for s in range(14):
        out = model(torch.zeros(()), torch.tensor(float(s)))
        (state,) = cache._ctx.states["branch"]
        stored = [t.dequantize() for t in state.tensors]
        if cache.is_full:
            expected = [f(s)]
            if previous is not None and s > config.first_enhance - 2:
                d = s - last_full
                for i in range(min(len(previous), config.max_order)):
                    expected.append((expected[i] - previous[i]) / d)
            assert len(stored) == len(expected)
            for i, (got, want) in enumerate(zip(stored, expected, strict=True)):
                fmt = E4M3 if i == 0 else fmt_diff
                assert (got - want).abs().le(error_bound(want, state.tensors[i].scale, fmt)).all(), (s, i)
            previous, last_full = stored, s
        else:
            k = s - last_full
            taylor = combine(stored, [k**i / [1, 1, 2][i] for i in range(len(stored))])
            torch.testing.assert_close(out, taylor, rtol=1e-6, atol=1e-6)


def test_forecasts_from_8bit_factors_stay_close_to_dense_fp32_ones():
    g = torch.Generator().manual_seed(9)
    a, b, c = (torch.randn(2, 40, 32, generator=g) for _ in range(3))
    f = lambda s: a + 0.3 * s * b + 0.02 * s * s * c  # noqa: E731
    for order in (1, 2):
        base = dict(interval=4, max_order=order, first_enhance=2)
        reference, _ = _run(f, CacheConfig(**base))
        quantised, _ = _run(f, CacheConfig(**base, factor_store="float8"))
        forecast_steps = [s for s in range(16) if s not in taylorseer.full_steps(16, CacheConfig(**base))]
        rel = max(((quantised[s] - reference[s]).norm() / reference[s].norm()).item() for s in forecast_steps)
        # measured 0.050 at most (O=1 and 2), right after the 1-apart warm-up steps where the old feature's
        # rounding (e4m3: ~2.5%) enters the forecast times k/d = 3; 0.02 once full steps are 4 apart
        assert 1e-3 < rel < 0.06, rel


def test_cache_bytes_with_8bit_factors_are_exact():
    f = lambda s: torch.full((2, 7, 12), float(s))  # noqa: E731
    for axis, scales in (("token", 2 * 7), ("channel", 2 * 12)):
        _, cache = _run(f, CacheConfig(interval=1, max_order=2, first_enhance=1, factor_store="float8",
                                       factor_scale=axis), steps=3)
        assert cache.nbytes() == 3 * (2 * 7 * 12 + scales * 4) == stored_nbytes((2, 7, 12), 3, "float8", axis)


def test_the_default_store_is_dense_and_unchanged():
    # The default path is today's code: the forecaster's own update on plain tensors of the factor dtype.
    config = CacheConfig(interval=3, max_order=2, first_enhance=2)
    assert config.factor_store == "dense" and config.tag == "N3-O2-W2"
    f = lambda s: torch.full((2, 3, 4), 0.1 * s**3 - s)  # noqa: E731
    outs, cache = _run(f, config)
    assert cache.store is None
    (state,) = cache._ctx.states["branch"]
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in state.tensors)
    # factor_scale means nothing to the dense store: same outputs bit for bit, same tag.
    same = CacheConfig(interval=3, max_order=2, first_enhance=2, factor_store="dense", factor_scale="channel")
    again, _ = _run(f, same)
    assert same.tag == config.tag and all(torch.equal(x, y) for x, y in zip(outs, again, strict=True))


# ------------------------------------------------------------------------------------------ config, tag
def test_tag_names_the_store():
    base = dict(interval=6, max_order=1, first_enhance=3)
    assert CacheConfig(**base, factor_store="float8").tag == "N6-O1-W3-f8"
    assert CacheConfig(**base, factor_store="float8", factor_scale="channel").tag == "N6-O1-W3-f8c"
    assert CacheConfig(**base, factor_store="float8_e5m2").tag == "N6-O1-W3-f8e5"
    assert CacheConfig(**base, factor_store="float8", forecaster="newton").tag == "N6-O1-W3-newton-f8"


@pytest.mark.parametrize("field,value,message", [
    ("factor_store", "int8", r"cache.factor_store='int8' is invalid: expected one of \['dense', 'float8', "),
    ("factor_scale", "row", r"cache.factor_scale='row' is invalid: expected one of \['token', 'channel'\]"),
])
def test_bad_store_settings_fail_with_the_choices(field, value, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**{field: value})


def test_a_materialised_forecast_counts_its_bytes():
    # ForecastCache.forecast (a cached module whose output is returned): dense O=1 reads two factors and
    # writes the sum; 8-bit: the first factor dequantised (1 byte + scales read, 4 written, 4 read + scales,
    # 4 written), the second cast (1 read, 4 written) and addcmul_-ed (sum, cast, scales read, sum written).
    f = lambda s: torch.full((2, 7, 12), 0.5 * s) + torch.arange(12.0)  # noqa: E731
    n, scales = 2 * 7 * 12, 2 * 7 * 4
    for store, expected in (("dense", 3 * n * 4), ("float8", (n + scales + 3 * 4 * n) + (n + scales + 4 * 4 * n))):
        model = Trajectory(f)
        cache = taylorseer.apply(model, CacheConfig(interval=3, max_order=1, first_enhance=1, factor_store=store),
                                 modules=["branch"], num_steps=8)
        for s in range(4):  # full steps 0 and 3
            model(torch.zeros(()), torch.tensor(float(s)))
        model(torch.zeros(()), torch.tensor(4.0))  # step 4 is a forecast step
        with count_traffic() as records:
            out = cache.forecast("branch")
        assert [(r.kernel, r.num_factors, r.bytes_moved) for r in records] == [("forecast", 2, expected)]
        torch.testing.assert_close(out, f(4), rtol=0.07, atol=0.07)
