"""*When* to compute: the full/forecast decision per sampling step, for every schedule policy.

``interval`` (the paper's rule, the default): upstream keeps a counter of forecast steps since the last
full step and computes again when it reaches N-1, after ``first_enhance`` warm-up steps that are always
computed. That is the same as the closed form below: full steps are N apart counted from the last warm-up
step. Example (FLUX, N=6, warm-up 3, 50 steps): 0, 1, 2, 8, 14, ..., 44 -> 10 full steps, 4.99x.

``budget`` and ``calibrated`` compute exactly K = ``budget`` steps (warm-up included), placed before
sampling starts (:mod:`taylorseer.core.placement`): by a fixed rule, or from a calibration file that holds
one uncached run's feature trajectory. ``adaptive`` decides online (:mod:`taylorseer.core.policies`); only its
fixed part (warm-up, forced last steps) is known in advance, so :func:`full_steps` refuses it: its
computed steps are what the cache's history says.
"""

from __future__ import annotations

import functools

from . import placement
from .config import CacheConfig, calibration_digest


def is_full_step(step: int, config: CacheConfig, num_steps: int | None = None) -> bool:
    """True when sampling step ``step`` (0-based, in sampling order) must really be computed.

    For ``adaptive`` this is the fixed part of the decision only (warm-up and forced last steps): the
    other steps are decided by the cache when the probe has run.
    """
    if not config.enabled or step < config.first_enhance:
        return True
    if num_steps is not None and config.last_full_steps and step >= num_steps - config.last_full_steps:
        return True
    if config.schedule == "interval":
        # The anchor is the last warm-up step (step 0 when there is no warm-up: nothing to forecast from).
        anchor = max(config.first_enhance - 1, 0)
        return (step - anchor) % config.interval == 0
    if config.schedule == "adaptive":
        return step == 0  # nothing to forecast from yet
    if num_steps is None:
        raise ValueError(f"cache.schedule={config.schedule} places its {config.budget} computed steps over the whole "
                         f"run: the number of sampling steps must be known (taylorseer.apply(..., num_steps=N))")
    return step in planned_steps(num_steps, config)


def warm_up_steps(config: CacheConfig, num_steps: int) -> int:
    """Steps after which a sampling call has run every forecast kernel it will run: with the interval rule, all
    O+1 factors exist after the warm-up and O+1 more full steps, and forecast steps follow each of them
    (warm-up + (O+2) N, at most num_steps); other schedules: the whole call. For untimed warm-up calls."""
    if config.schedule != "interval" or not config.enabled:
        return num_steps
    return min(num_steps, config.first_enhance + (config.max_order + 2) * config.interval)


def full_steps(num_steps: int, config: CacheConfig) -> list[int]:
    """Indices of the computed steps of a sampling run of ``num_steps`` steps (a static schedule)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} is invalid: expected an integer >= 1")
    if config.enabled and config.schedule == "adaptive":
        raise ValueError("cache.schedule=adaptive decides its computed steps while sampling: read them from the "
                         "cache's history (cache.last_call.full_steps()), not from the schedule")
    return [s for s in range(num_steps) if is_full_step(s, config, num_steps)]


def compression(num_steps: int, config: CacheConfig) -> float:
    """Total steps / full steps: the FLOPs compression if a forecast step cost nothing."""
    return num_steps / len(full_steps(num_steps, config))


def planned_steps(num_steps: int, config: CacheConfig) -> frozenset[int]:
    """The K computed steps of a ``budget`` or ``calibrated`` schedule (warm-up and forced last steps included).

    Planned once per process and settings (a calibrated placement takes seconds); the calibration file's
    content is part of the key, so a rewritten file is planned again."""
    digest = calibration_digest(config.calibration) if config.schedule == "calibrated" else None
    return _planned(num_steps, config, digest)


@functools.lru_cache(maxsize=64)
def _planned(num_steps: int, config: CacheConfig, _digest: str | None) -> frozenset[int]:
    fixed = sorted({s for s in range(min(config.first_enhance, num_steps))} | {0}
                   | ({s for s in range(num_steps - config.last_full_steps, num_steps)} if config.last_full_steps
                      else set()))
    if config.budget > num_steps:
        raise ValueError(f"cache.budget={config.budget} is more than the {num_steps} sampling steps")
    if len(fixed) > config.budget:
        raise ValueError(f"cache.budget={config.budget} leaves no room: the warm-up and forced last steps alone are "
                         f"{len(fixed)} computed steps ({fixed})")
    if config.schedule == "budget":
        steps = placement.rule_based(num_steps, config.budget, fixed, config)
    else:
        steps = placement.calibrated(num_steps, config.budget, fixed, config)
    return frozenset(steps)
