"""The training pieces the bundled models share: warm-up + cosine learning rate, EMA of the weights."""

import math

import pytest
import torch

from taylorseer.harness.training import ema_update, warmup_cosine_lr


def test_warmup_then_cosine_to_the_floor():
    lr = [warmup_cosine_lr(s, total=1000, lr=1e-3, warmup=100, min_lr=1e-5) for s in range(1001)]
    assert lr[0] == pytest.approx(1e-5) and lr[99] == pytest.approx(1e-3)  # linear warm-up, peak at its end
    assert lr[100] == pytest.approx(1e-3) and lr[1000] == pytest.approx(1e-5)
    assert lr[550] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way down the cosine
    assert all(a >= b for a, b in zip(lr[100:], lr[101:], strict=False))
    assert not math.isnan(warmup_cosine_lr(5, total=5, lr=1.0, warmup=5, min_lr=0.0))


def test_ema_update_is_the_weighted_average():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)
