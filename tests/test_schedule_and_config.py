"""The schedule gives the paper's compressions; bad settings fail with a message naming the field."""

import pytest

from taylorseer import CacheConfig, compression, full_steps, is_full_step


@pytest.mark.parametrize(
    "interval, warmup, n_full, ratio",
    [
        (3, 2, 18, 2.78),  # DiT N=3 (paper "2.77x")
        (4, 2, 14, 3.57),  # DiT N=4
        (5, 2, 11, 4.55),  # DiT N=5 (paper 4.53x)
        (6, 3, 10, 5.00),  # FLUX N=6 (4.99x in FLOPs: forecast steps still cost a little)
        (5, 1, 10, 5.00),  # HunyuanVideo N=5
        (6, 1, 9, 5.56),  # HunyuanVideo N=6
    ],
)
def test_paper_schedules(interval, warmup, n_full, ratio):
    config = CacheConfig(interval=interval, first_enhance=warmup)
    assert len(full_steps(50, config)) == n_full
    assert round(compression(50, config), 2) == ratio


def test_exact_full_steps():
    assert full_steps(50, CacheConfig(interval=6, first_enhance=3)) == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]
    assert full_steps(50, CacheConfig(interval=5, first_enhance=1)) == list(range(0, 50, 5))
    assert full_steps(50, CacheConfig(interval=3, first_enhance=2)) == [0] + list(range(1, 50, 3))
    # No warm-up: step 0 is still computed (nothing to forecast from).
    assert full_steps(10, CacheConfig(interval=4, first_enhance=0)) == [0, 4, 8]


def test_interval_one_and_disabled_compute_every_step():
    assert full_steps(50, CacheConfig(interval=1)) == list(range(50))
    assert full_steps(50, CacheConfig(interval=6, enabled=False)) == list(range(50))


def test_forced_last_full_steps():
    config = CacheConfig(interval=6, first_enhance=3, last_full_steps=2)
    assert full_steps(50, config)[-3:] == [44, 48, 49]
    assert is_full_step(49, config, num_steps=50) and not is_full_step(49, config)


def test_tag():
    assert CacheConfig(interval=6, max_order=1, first_enhance=3).tag == "N6-O1-W3"
    assert CacheConfig(interval=4, max_order=2, first_enhance=2, forecaster="newton").tag == "N4-O2-W2-newton"
    assert CacheConfig(enabled=False).tag == "nocache"


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("interval", 0, "cache.interval=0 is invalid: expected an integer >= 1"),
        ("interval", 2.5, "cache.interval=2.5"),
        ("max_order", -1, "cache.max_order=-1 is invalid: expected an integer in [0, 8]"),
        ("first_enhance", -2, "cache.first_enhance=-2"),
        ("factor_dtype", "int8", "cache.factor_dtype='int8' is invalid"),
        ("step_distance", "sigma", "expected one of ['index', 'timestep']"),
        ("forecaster", "spline", "cache.forecaster='spline'"),
    ],
)
def test_bad_values_name_the_field(field, value, fragment):
    with pytest.raises(ValueError) as err:
        CacheConfig(**{field: value})
    assert fragment in str(err.value)


def test_unknown_option_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown cache option\(s\) \['intervall'\].*'interval'"):
        CacheConfig.from_dict({"intervall": 4})


def test_full_steps_rejects_zero_steps():
    with pytest.raises(ValueError, match="num_steps=0"):
        full_steps(0, CacheConfig())
