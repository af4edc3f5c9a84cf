"""Where to put K computed steps: a fixed rule (``schedule: budget``) or one calibrated run (``calibrated``).

Both place exactly ``K = cache.budget`` computed steps, the warm-up steps (``first_enhance``) and forced last
steps (``last_full_steps``) included, before sampling starts.

**Rule (``budget``).** Diffusion features change slowly at high noise and ever faster towards the end of
sampling (measured on both bundled models, docs/schedules.md), so the free steps are placed by a power
warp denser at the end: the i-th of the m free steps (i = 1..m) lands at

    s_i = a + (n - 1 - a) * (1 - (1 - i / m) ^ p),      p = 1.5, a = the last fixed step before them,

rounded, collisions pushed apart. p = 1 is a uniform spread; p = 1.5 fits the calibrated optima of the
bundled digits DiT within one or two steps (e.g. K=10 of 50: 0, 8, 16, 22, 29, 34, 40, 44, 47, 49).

**Calibrated.** A calibration file (:mod:`taylorseer.core.calibration`) holds, for every step of one uncached
run, a random sketch ``X_s`` of every cached module's output (a fixed random subset of coordinates, each
module scaled to unit RMS) and the measured sensitivity ``w_s`` of the final sample to a feature error at
step s. Every forecaster here is linear in the features with weights that depend on the positions only,
so the forecast of the sketch is the sketch of the forecast: the error a schedule S would make is

    E(S) = sum_{s not in S} w_s * ||X^_s(S) - X_s||^2 / ||X_s||^2,

where ``X^_s(S)`` is computed by running the configured forecaster itself (its own update and predict, at
the configured order and warm-up rule) over the sketch. The placement minimises E over the sets of K
steps that contain the fixed ones, by coordinate descent (move one step by up to +-4 while E falls, then
relocate one step anywhere while E falls) from several starting warps (p = 0.7, 1, 1.5, 2), keeping the
best. Deterministic; seconds for 50 steps.
"""

from __future__ import annotations

import math

import torch

from .calibration import load
from .config import CacheConfig
from .forecast import Factors, make_forecaster

RULE_POWER = 1.5
START_POWERS = (0.7, 1.0, 1.5, 2.0)
MOVES = (-4, -3, -2, -1, 1, 2, 3, 4)


def warped(num_steps: int, budget: int, fixed: list[int], power: float = RULE_POWER, anchor: int = 0) -> list[int]:
    """``fixed`` plus ``budget - len(fixed)`` free steps at ``a + (n - 1 - a) * (1 - (1 - i/m)^power)``,
    i = 1..m, a = ``anchor`` (the last warm-up step), each rounded to the nearest step not yet taken."""
    taken = set(fixed)
    free = budget - len(taken)
    span = num_steps - 1 - anchor
    for i in range(1, free + 1):
        target = anchor + span * (1 - (1 - i / free) ** power)
        # Prefer steps after the anchor, then the nearest, then the later one: rounding never merges two steps.
        step = min((s for s in range(num_steps) if s not in taken), key=lambda s: (s <= anchor, abs(s - target), -s))
        taken.add(step)
    return sorted(taken)


def rule_based(num_steps: int, budget: int, fixed: list[int], config: CacheConfig) -> list[int]:
    """The ``budget`` schedule: the fixed steps plus the rest on the p = 1.5 warp."""
    return warped(num_steps, budget, fixed, RULE_POWER, anchor=max(config.first_enhance - 1, 0))


def calibrated(num_steps: int, budget: int, fixed: list[int], config: CacheConfig) -> list[int]:
    """The ``calibrated`` schedule: the K steps of least estimated error E on the calibration's trajectory."""
    calibration = load(config.calibration)
    if calibration.num_steps != num_steps:
        raise ValueError(f"cache.calibration={config.calibration!r} was measured over {calibration.num_steps} "
                         f"sampling steps, this run has {num_steps}: calibrate again with num_steps={num_steps}")
    positions = calibration.positions(config.step_distance)
    return optimise(calibration.trajectory, calibration.sensitivity, positions, budget, fixed, config)[0]


def estimated_error(trajectory: torch.Tensor, weights: torch.Tensor, positions: list[float], steps: set[int],
                    config: CacheConfig) -> float:
    """E(S) of the module docstring: the configured forecaster run over the sketch, weighted squared errors."""
    forecaster = make_forecaster(config.forecaster, config.max_order)
    state = Factors()
    total = 0.0
    for s in range(trajectory.shape[0]):
        if s in steps:
            # Same warm-up rule as the cache: derivatives only at full steps s > first_enhance - 2.
            forecaster.update(state, trajectory[s], positions[s], s > config.first_enhance - 2, trajectory.dtype)
        elif weights[s] > 0:
            error = forecaster.predict(state, positions[s]) - trajectory[s]
            total += float(weights[s]) * float(error.pow(2).sum() / trajectory[s].pow(2).sum().clamp_min(1e-30))
    return total


def optimise(trajectory: torch.Tensor, weights: torch.Tensor, positions: list[float], budget: int,
             fixed: list[int], config: CacheConfig) -> tuple[list[int], float]:
    """Coordinate descent on E from several warps; returns (steps, E). The fixed steps never move."""
    num_steps = trajectory.shape[0]
    trajectory = trajectory.double()
    fixed_set = set(fixed)
    best: tuple[float, list[int]] | None = None
    seen: dict[tuple[int, ...], float] = {}

    def cost(steps: list[int]) -> float:
        key = tuple(steps)
        if key not in seen:
            seen[key] = estimated_error(trajectory, weights, positions, set(steps), config)
        return seen[key]

    for power in START_POWERS:
        current = warped(num_steps, budget, fixed, power, anchor=max(config.first_enhance - 1, 0))
        value = cost(current)
        for moves in (MOVES, None):  # local moves first, then relocation anywhere (escapes local minima)
            improved = True
            while improved:  # passes over the movable steps; each takes its best move when that lowers E
                improved = False
                for index in range(len(current)):
                    step = current[index]
                    if step in fixed_set:
                        continue
                    targets = range(num_steps) if moves is None else (step + m for m in moves)
                    targets = [s for s in targets if 0 <= s < num_steps and s not in current]
                    if not targets:
                        continue
                    scored = [(cost(sorted(current[:index] + [s] + current[index + 1:])), s) for s in targets]
                    candidate_value, moved = min(scored)
                    if candidate_value < value * (1 - 1e-9):
                        current = sorted(current[:index] + [moved] + current[index + 1:])
                        value, improved = candidate_value, True
        if best is None or value < best[0]:
            best = (value, current)
    assert best is not None
    return best[1], best[0]


def predicted_psnr_gain(error: float) -> float:
    """-10 log10 E: a relative figure of merit for comparing placements (dB)."""
    return -10 * math.log10(max(error, 1e-30))
