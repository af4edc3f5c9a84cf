"""TaylorSeer: a forecasting feature cache for diffusion transformers.

Public API:
    CacheConfig            the settings (interval N, order O, warm-up, ...) and their run-name tag
    apply / remove         attach to / detach from named submodules of an unmodified model
    get_cache              the ForecastCache attached to a model (reset, contexts, bytes, history)
    full_steps, compression, is_full_step      the schedule
    count_flops, count_schedule                FLOPs with torch's FlopCounterMode
    compile / uncompile    regional torch.compile that keeps the cache out of the graphs
"""

from .cache import ForecastCache
from .compile import compile, uncompile  # noqa: A004 - taylorseer.compile(model), as documented
from .config import CacheConfig
from .flops import FlopsReport, count_flops, count_schedule
from .hooks import apply, get_cache, remove
from .schedule import compression, full_steps, is_full_step

__all__ = [
    "CacheConfig",
    "ForecastCache",
    "FlopsReport",
    "apply",
    "remove",
    "get_cache",
    "full_steps",
    "compression",
    "is_full_step",
    "count_flops",
    "count_schedule",
    "compile",
    "uncompile",
]
