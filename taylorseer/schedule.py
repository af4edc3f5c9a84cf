"""*When* to compute: the full/forecast decision per sampling step.

Upstream keeps a counter of forecast steps since the last full step and computes again when it
reaches N-1, after ``first_enhance`` warm-up steps that are always computed. That is the same as the
closed form below: full steps are N apart counted from the last warm-up step. Example (FLUX, N=6,
warm-up 3, 50 steps): 0, 1, 2, 8, 14, ..., 44 -> 10 full steps, 4.99x.
"""

from __future__ import annotations

from .config import CacheConfig


def is_full_step(step: int, config: CacheConfig, num_steps: int | None = None) -> bool:
    """True when sampling step ``step`` (0-based, in sampling order) must really be computed."""
    if not config.enabled or step < config.first_enhance:
        return True
    if num_steps is not None and config.last_full_steps and step >= num_steps - config.last_full_steps:
        return True
    # The anchor is the last warm-up step (step 0 when there is no warm-up: nothing to forecast from).
    anchor = max(config.first_enhance - 1, 0)
    return (step - anchor) % config.interval == 0


def full_steps(num_steps: int, config: CacheConfig) -> list[int]:
    """Indices of the computed steps of a sampling run of ``num_steps`` steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} is invalid: expected an integer >= 1")
    return [s for s in range(num_steps) if is_full_step(s, config, num_steps)]


def compression(num_steps: int, config: CacheConfig) -> float:
    """Total steps / full steps: the FLOPs compression if a forecast step cost nothing."""
    return num_steps / len(full_steps(num_steps, config))
