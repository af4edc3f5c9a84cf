"""FLOPs accounting with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``.

Convention: FlopCounterMode counts 2 FLOPs per multiply-add (a matmul of (m,k)x(k,n) is 2mkn), and
only matmul/convolution/attention ops; elementwise work (norms, gates, the forecast itself) counts
zero. The DiT paper's "118.6 Gflops" counts multiply-adds once: divide our FLOPs by 2 to compare.

It runs on the ``meta`` device too, so full-size FLUX/HunyuanVideo/DiT-XL can be counted on a CPU
without weights. A sampling run's total is ``full_steps * full_step + forecast_steps * forecast_step``
(all calls of a step cost the same), which is what :func:`count_schedule` measures: one computed and
one forecast call of the real model with the cache attached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop

from ..core.cache import ForecastCache
from ..core.policies import AdaptivePolicy
from ..core.schedule import full_steps


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


# SDPA's CPU kernel is missing from FlopCounterMode's registry (it counts the CUDA kernels, and the
# meta device decomposes attention into matmuls): without this, attention would count zero on a CPU.
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (2 per multiply-add) of the ops ``fn`` runs, the same on CPU, CUDA and meta tensors."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class FlopsReport:
    num_steps: int
    full_steps: float  # computed steps per call; a mean over calls for a data-dependent (adaptive) schedule
    calls_per_step: int
    full_step_flops: int  # one computed denoiser call
    forecast_step_flops: int  # one forecast denoiser call (what still runs: embedders, modulation, final layer;
    #                           with schedule=adaptive also everything up to and including the probe)
    data_dependent: bool = False  # full_steps is what the run observed, not what a schedule fixes in advance

    def observed(self, full_steps: float) -> FlopsReport:
        """The same costs with the computed steps a run really made (adaptive: from the cache's history)."""
        return dataclasses.replace(self, full_steps=full_steps, data_dependent=True)

    @property
    def flops_uncached(self) -> int:
        return self.num_steps * self.calls_per_step * self.full_step_flops

    @property
    def flops_total(self) -> int:
        forecast = self.num_steps - self.full_steps
        return self.calls_per_step * (self.full_steps * self.full_step_flops + forecast * self.forecast_step_flops)

    @property
    def compression(self) -> float:
        """FLOPs compression: uncached FLOPs / cached FLOPs."""
        return self.flops_uncached / self.flops_total

    @property
    def schedule_compression(self) -> float:
        return self.num_steps / self.full_steps

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(
            flops_uncached=self.flops_uncached,
            flops_total=self.flops_total,
            tflops_uncached=self.flops_uncached / 1e12,
            tflops_total=self.flops_total / 1e12,
            compression=round(self.compression, 4),
            schedule_compression=round(self.schedule_compression, 4),
            flops_convention="FlopCounterMode: 2 FLOPs per multiply-add; elementwise ops not counted",
        )
        return out


def count_schedule(call: Callable[[], object], cache: ForecastCache | None, num_steps: int,
                   calls_per_step: int = 1) -> FlopsReport:
    """Count one computed and one forecast call of the model and extrapolate to the run's schedule.

    ``call`` runs the cached model once on representative inputs. The cache's own schedule is
    saved and restored: for the count, step 0 is made full and step 1 a forecast. With
    ``schedule=adaptive`` the forecast call runs the probe and decides "forecast" (threshold infinite),
    so its count includes the probe; the computed steps are not known before sampling: the report holds
    the bound (``budget``, else every step) until the app replaces it with what ran (:meth:`observed`).
    """
    full_step = count_flops(call) if cache is None else None
    if cache is None:
        return FlopsReport(num_steps, num_steps, calls_per_step, full_step, full_step)
    config = cache.config
    saved_num_steps = cache.num_steps
    # offload=False: the count may run on the meta device, where there is nothing to copy to the host.
    adaptive = config.schedule == "adaptive"
    counting = dataclasses.replace(config, interval=max(config.interval, 2), first_enhance=0, last_full_steps=0,
                                   enabled=True, step_distance="index", offload=False, prefetch=False)
    if not adaptive:  # the schedule of the count is the interval rule's: step 0 full, step 1 forecast
        counting = dataclasses.replace(counting, schedule="interval", budget=0, calibration=None)
    else:
        counting = dataclasses.replace(counting, threshold=math.inf, budget=0)
    saved_policy = cache.policy
    cache.config = counting
    cache.policy = AdaptivePolicy(counting) if adaptive else None
    cache.reset(num_steps=None)
    try:
        full_step = count_flops(call)
        forecast_step = count_flops(call)
    finally:
        cache.config, cache.policy = config, saved_policy
        cache.reset(num_steps=saved_num_steps)
    if not config.enabled:
        return FlopsReport(num_steps, num_steps, calls_per_step, full_step, forecast_step)
    if adaptive:
        bound = min(config.budget, num_steps) if config.budget else num_steps
        return FlopsReport(num_steps, bound, calls_per_step, full_step, forecast_step, data_dependent=True)
    return FlopsReport(num_steps, len(full_steps(num_steps, config)), calls_per_step, full_step, forecast_step)
