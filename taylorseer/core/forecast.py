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

HermiteForecaster (option, HiCache's idea): the same factors as Taylor, the monomials k^i replaced by
scaled probabilists' Hermite polynomials, ``k^i -> s^i He_i(k / s)`` with ``s = hermite_scale * d``
(He_0 = 1, He_1 = x, He_2 = x^2 - 1, He_3 = x^3 - 3x). Orders 0 and 1 are Taylor's exactly; from order
2 on each term is damped by lower-order corrections (k^2 - s^2, k^3 - 3 s^2 k), which is the Taylor
polynomial smoothed by the heat kernel run backwards over a width s. Exact on degree <= 1 only; for O=2
on a quadratic with equal gaps h it is upstream's forecast minus s^2 f'' / 2 (s = h / 2).

FeedbackForecaster (option, a predictor-corrector): Taylor of order O plus the error of the previous
prediction carried forward. At a full step s the prediction the forecaster had made for s from the
previous full step, F^_s, is compared with the computed F_s; the residual e_s = F_s - F^_s is stored as
one more factor and the forecast at s + k becomes
    F(s + k) ~= sum_i D_i k^i / i!  +  e_s (k / h)^(O+1),        h = s - s_prev,
i.e. the next full step corrects the extrapolation that predicted it, assuming the next interval's
error grows like the last one's (as k^(O+1), the leading error term of an order-O extrapolation).
Exact where Taylor is, on polynomials of degree <= 1 (then e_s = 0). For O = 1 on a quadratic with
equal gaps h the forecast is f(s + k) + k (k - h): exact at k = h, |error| <= h^2 / 4 in between
(Taylor O=1: -k (k + h); upstream O=2: -h k). One more factor of memory.
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
        # ``.nbytes`` of a tensor, or of an 8-bit factor (data + scale: taylorseer.core.store.ScaledFactor)
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

    def spare(self, state: Factors, derive: bool) -> torch.Tensor | None:
        """The buffer :meth:`update` will store its feature in (no factor of it is read by the update): a feature
        computed straight into it is not copied."""
        old = state.tensors
        if not derive or not old:
            return old[0] if old else None
        orders = min(len(old), self.max_order)
        return old[orders] if len(old) > orders else None

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

    def spare(self, state: Factors, derive: bool) -> torch.Tensor | None:
        """As :meth:`TaylorForecaster.spare` (every full step derives here)."""
        old = state.tensors
        orders = min(len(old), self.max_order)
        return old[orders] if len(old) > orders else None

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


class HermiteForecaster(TaylorForecaster):
    """Taylor's factors on a scaled Hermite basis (see the module docstring)."""

    def __init__(self, max_order: int, scale: float = 0.5):
        super().__init__(max_order)
        self.scale = scale

    def update(self, state: Factors, feature: torch.Tensor, position: float, derive: bool,
               dtype: torch.dtype) -> None:
        previous = state.positions[-1] if state.positions else None
        super().update(state, feature, position, derive, dtype)
        # Keep the last distance d as the basis's scale (Taylor itself only needs the newest position).
        state.positions = [previous if previous is not None else position, position]

    def weights(self, positions: list[float], position: float, num_factors: int) -> list[float]:
        """``s^i He_i(k / s) / i!`` at distance k, s = scale * (distance of the last two full steps)."""
        k = position - positions[-1]
        s = self.scale * abs(positions[-1] - positions[0]) if len(positions) > 1 else 0.0
        return [scaled_hermite(i, k, s) / math.factorial(i) for i in range(num_factors)]


def scaled_hermite(n: int, x: float, s: float) -> float:
    """``s^n He_n(x / s)`` (probabilists' Hermite), by the recurrence He_{n+1}(y) = y He_n(y) - n He_{n-1}(y)
    multiplied through by s^{n+1}: P_{n+1} = x P_n - n s^2 P_{n-1}, P_0 = 1, P_1 = x. At s = 0 it is x^n."""
    prev, cur = 1.0, x
    if n == 0:
        return prev
    for m in range(1, n):
        prev, cur = cur, x * cur - m * s * s * prev
    return cur


class FeedbackForecaster(TaylorForecaster):
    """Taylor plus the last prediction's residual, scaled as (k / h)^(O+1) (see the module docstring).

    ``state.tensors`` holds the Taylor factors D_0..D_m, then the residual e (once a prediction existed);
    ``state.positions`` holds [previous full step, last full step].
    """

    def update(self, state: Factors, feature: torch.Tensor, position: float, derive: bool,
               dtype: torch.dtype) -> None:
        previous = state.positions[-1] if state.positions else None
        taylor = state.tensors[:-1] if _has_residual(state, self.max_order) else state.tensors
        residual_buffer = state.tensors[-1] if len(taylor) < len(state.tensors) else None
        residual = None
        if derive and taylor and len(taylor) == self.max_order + 1 and self.max_order > 0:
            # The prediction for this step from the factors as they are, before they are updated.
            predicted = combine(taylor, TaylorForecaster.weights(self, [previous], position, len(taylor)))
            residual = _store(feature, residual_buffer, dtype).sub_(predicted)
        state.tensors = taylor
        TaylorForecaster.update(self, state, feature, position, derive, dtype)
        if residual is not None:
            state.tensors = state.tensors + [residual]
        state.positions = [previous if previous is not None else position, position]

    def spare(self, state: Factors, derive: bool) -> torch.Tensor | None:
        return None  # the residual reads the feature against the factors before they change

    def weights(self, positions: list[float], position: float, num_factors: int) -> list[float]:
        k = position - positions[-1]
        taylor = min(num_factors, self.max_order + 1)
        out = [k**i / math.factorial(i) for i in range(taylor)]
        if num_factors > taylor:
            h = positions[-1] - positions[0]
            out.append((k / h) ** (self.max_order + 1) if h else 0.0)
        return out


def _has_residual(state: Factors, max_order: int) -> bool:
    return len(state.tensors) == max_order + 2


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
    if spare is feature:
        return spare  # computed in place already (taylorseer.attach.fold)
    if spare is not None and spare.shape == feature.shape and spare.dtype == dtype and spare.device == feature.device:
        return spare.copy_(feature)
    return feature.to(dtype=dtype, copy=True)


FORECASTER_CLASSES = {"taylor": TaylorForecaster, "newton": NewtonForecaster, "hermite": HermiteForecaster,
                      "feedback": FeedbackForecaster}


def make_forecaster(name: str, max_order: int):
    if name not in FORECASTER_CLASSES:
        raise ValueError(f"unknown forecaster {name!r}: expected one of {sorted(FORECASTER_CLASSES)}")
    return FORECASTER_CLASSES[name](max_order)
