"""*How* to forecast: the factors kept per cached module and the extrapolation from them.

A forecaster is stateless; the state of one cached tensor is a :class:`Factors` record. Both
forecasters work in place on buffers the cache owns (no allocation in the steady state, two
kernels per order at a full step, one fused kernel per order at a forecast step), because a
forecast step must cost almost nothing next to a computed one. An order-0 forecast returns the
stored buffer itself: it stays valid until the module's next full step.

TaylorForecaster (upstream-exact, paper eq. 7-8):
    full step at s with feature F_s and distance d = s - s_prev:
        D_0 = F_s,  D_{i+1} = (D_i^new - D_i^old) / d            (backward differences)
    forecast at s + k:  F(s + k) ~= sum_i D_i k^i / i!
    Exact on polynomials of degree <= 1 (any order). On a quadratic f with uniform full-step
    spacing h, order 2 gives f(s + k) - h * f'' * k / 2: backward differences are centred half a
    step behind. Order 0 is plain reuse (FORA).

NewtonForecaster (option): the Newton interpolating polynomial through the last O+1 full steps at
their real positions, evaluated at the forecast position. Exact on polynomials of degree <= O for
any spacing, including the 1-apart warm-up steps followed by N-apart steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Factors:
    """The stored state of one cached tensor: ``tensors[i]`` is the i-th factor, ``positions`` the
    positions (step index or timestep) of the full steps they were formed at, newest last."""

    tensors: list[torch.Tensor] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)
    out_dtype: torch.dtype | None = None  # dtype the model expects back from a forecast
    device: torch.device | None = None  # where the module ran (factors may live elsewhere: offload)

    def nbytes(self) -> int:
        # ``.nbytes`` of a tensor, or of an 8-bit factor (data + scale: taylorseer.store.ScaledFactor)
        return sum(t.nbytes for t in self.tensors)


class TaylorForecaster:
    """Upstream TaylorSeer: Taylor series with backward-difference derivatives."""

    def __init__(self, max_order: int):
        self.max_order = max_order

    def update(self, state: Factors, feature: torch.Tensor, position: float, derive: bool,
               dtype: torch.dtype) -> None:
        old = state.tensors
        if not derive or not old:
            # Warm-up (or first) full step: only the feature itself is kept.
            state.tensors, state.positions = [_store(feature, old[0] if old else None, dtype)], [position]
            return
        d = position - state.positions[-1]
        orders = min(len(old), self.max_order)
        prev = feature
        for i in range(orders):
            # old[i] <- (prev - old[i]) / d, written into old[i]'s storage: it is no longer needed.
            prev = old[i].sub_(prev).div_(-d)
        state.tensors = [_store(feature, old[orders] if len(old) > orders else None, dtype)] + old[:orders]
        state.positions = [position]

    def weights(self, positions: list[float], position: float, num_factors: int) -> list[float]:
        """forecast = sum_i weights[i] * factor_i, with weights k^i / i! at distance k from the last full step."""
        k = position - positions[-1]
        return [k**i / math.factorial(i) for i in range(num_factors)]

    def predict(self, state: Factors, position: float) -> torch.Tensor:
        return combine(state.tensors, self.weights(state.positions, position, len(state.tensors)))


class NewtonForecaster:
    """Newton divided differences on the real positions of the last O+1 full steps."""

    def __init__(self, max_order: int):
        self.max_order = max_order

    def update(self, state: Factors, feature: torch.Tensor, position: float, derive: bool,
               dtype: torch.dtype) -> None:
        # The warm-up rule of upstream exists because its derivatives assume one step distance;
        # divided differences know every distance, so every full step contributes.
        old, nodes = state.tensors, state.positions  # nodes newest last, len(nodes) == len(old)
        orders = min(len(old), self.max_order)
        prev = feature
        for i in range(orders):
            # f[x_new, x_0..x_i] = (f[x_new, x_0..x_{i-1}] - f[x_0..x_i]) / (x_new - x_i), x_0 newest.
            node = nodes[len(nodes) - 1 - i]
            prev = old[i].sub_(prev).div_(node - position)
        state.tensors = [_store(feature, old[orders] if len(old) > orders else None, dtype)] + old[:orders]
        state.positions = (nodes + [position])[-(orders + 1) :]

    def weights(self, positions: list[float], position: float, num_factors: int) -> list[float]:
        """Newton basis at ``position``: 1, (x - x0), (x - x0)(x - x1), ... with x0 the newest node."""
        newest_first = positions[::-1]
        out, weight = [1.0], 1.0
        for i in range(1, num_factors):
            weight *= position - newest_first[i - 1]
            out.append(weight)
        return out

    def predict(self, state: Factors, position: float) -> torch.Tensor:
        return combine(state.tensors, self.weights(state.positions, position, len(state.tensors)))


def combine(factors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * factors[i] with weights[0] == 1: one fused kernel per order.

    A single factor is returned as it is (order 0 / first step): no copy.
    """
    if len(factors) == 1:
        return factors[0]
    out = torch.add(factors[0], factors[1], alpha=weights[1])
    for factor, weight in zip(factors[2:], weights[2:], strict=True):
        out.add_(factor, alpha=weight)
    return out


def _store(feature: torch.Tensor, spare: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Copy ``feature`` into a buffer the cache owns, reusing the retired ``spare`` when it fits.

    Owning the buffers is what allows the in-place updates above: the model's own output tensor is
    never written to, and the steady state allocates nothing.
    """
    if spare is not None and spare.shape == feature.shape and spare.dtype == dtype and spare.device == feature.device:
        return spare.copy_(feature)
    return feature.to(dtype=dtype, copy=True)


def make_forecaster(name: str, max_order: int):
    if name == "taylor":
        return TaylorForecaster(max_order)
    if name == "newton":
        return NewtonForecaster(max_order)
    raise ValueError(f"unknown forecaster {name!r}: expected 'taylor' or 'newton'")
