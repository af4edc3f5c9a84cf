"""TaylorSeer: a forecasting feature cache for diffusion transformers.

Public API:
    CacheConfig            the settings (interval N, order O, warm-up, ...) and their run-name tag
    apply / remove         attach to / detach from an unmodified model or pipeline (family preset from its class,
                           or block descriptions / module patterns for any other model)
    get_cache, summary     the ForecastCache attached to a model (reset, contexts, bytes, history); what was wrapped
    BlockSpec, Branch, LinearGate, TableGate, ChunkGate   describe a block's residual branches (attach.blocks)
    presets                the family presets (dit, flux, hunyuan_video, wan, sd3, pixart, cogvideox, qwenimage,
                           flux2, ltx, hunyuan_video15, sana, lumina2, cogview4)
    full_steps, compression, is_full_step      the schedule
    count_flops, count_schedule                FLOPs with torch's FlopCounterMode
    compile / uncompile    regional torch.compile that keeps the cache out of the graphs
"""

from .attach import presets
from .attach.blocks import BlockSpec, Branch, ChunkGate, LinearGate, TableGate
from .attach.hooks import apply, get_cache, remove, summary
from .core.cache import ForecastCache
from .core.config import CacheConfig
from .core.schedule import compression, full_steps, is_full_step
from .perf.compile import compile, uncompile  # noqa: A004 - taylorseer.compile(model), as documented
from .perf.flops import FlopsReport, count_flops, count_schedule

__all__ = [
    "CacheConfig",
    "ForecastCache",
    "FlopsReport",
    "apply",
    "remove",
    "get_cache",
    "summary",
    "presets",
    "BlockSpec",
    "Branch",
    "LinearGate",
    "TableGate",
    "ChunkGate",
    "full_steps",
    "compression",
    "is_full_step",
    "count_flops",
    "count_schedule",
    "compile",
    "uncompile",
]
