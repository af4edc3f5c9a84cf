"""The adaptive schedule: decide online, from a cheap error estimate, whether to compute a step.

``schedule: adaptive`` computes the warm-up steps, then on every later step runs the model only up to and
including a *probe* module (the first block by default). The probe's real output ``p_s`` is compared with
what the cache's own forecaster predicts for it from the probe's factors at the last computed steps,

    e_s = sum |p^_s - p_s| / sum |p_s|                 (relative L1, as TeaCache and FBCache measure change)

which estimates how wrong the forecasts of the other modules would be at this step (SpeCa's "forecast,
then verify", on one block instead of the whole model). The step is computed when

    e_s > threshold    or    s - (last computed step) >= interval,

unless ``budget`` computed steps have been spent (``budget: 0`` is no bound): the budget is a hard upper
bound on computed steps, warm-up included. Everything before the probe runs on every step (its cost is
in the FLOPs of a forecast step, counted with the probe running); its outputs are exact.

The decision is per model call: a batch computes or forecasts together (the error is summed over the
batch), so with this policy a sample depends on the batch it is sampled in.
"""

from __future__ import annotations

from .config import CacheConfig

PROBE = "__probe__"  # the cache's name for the probe's factors


class AdaptivePolicy:
    def __init__(self, config: CacheConfig):
        self.threshold = float(config.threshold)
        self.budget = int(config.budget)
        self.max_gap = int(config.interval)

    def decide(self, error: float, step: int, last_full: int, computed: int) -> bool:
        """True: compute this step. ``computed`` counts the computed steps of this call so far."""
        if self.budget and computed >= self.budget:
            return False
        if step - last_full >= self.max_gap:
            return True
        return error > self.threshold
