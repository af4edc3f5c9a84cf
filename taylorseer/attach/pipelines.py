"""The denoisers of a pipeline, and the extra calls a step makes of one of them.

A pipeline may denoise with more than one transformer: Wan 2.2 runs ``transformer`` on the high-noise steps and
``transformer_2`` on the rest; two-stage pipelines do alike. ``taylorseer.apply(pipe)`` caches each of them (its own
cache, its first call always computed, the schedule on the pipeline's step index where the pipeline gives it).
Where the pipeline says which part of its loop each denoiser runs (Wan 2.2's ``boundary_ratio``), each cache's
sampling call is its part: its own step count, warm-up and last steps (:func:`loop_part`).

Within one step a pipeline may call a denoiser more than once with other arguments: SD3.5's skip-layer guidance
calls the transformer again with ``skip_layers=[...]`` (and another batch). Such a call gets its own cache context,
named after what differs (``default+skip_layers``), so its features never mix with the main call's.
"""

from __future__ import annotations

import torch

_DENOISER_PREFIXES = ("transformer", "unet", "prior", "decoder")


def denoisers(pipeline) -> list[tuple[str, torch.nn.Module]]:
    """``(component name, module)`` of every denoiser of ``pipeline``: ``transformer`` first, then
    ``transformer_2``, ... (and ``unet``s, for pipelines built on one), those set to None left out."""
    names = []
    components = getattr(pipeline, "components", None)
    if isinstance(components, dict):
        names = [n for n in components if n.startswith(_DENOISER_PREFIXES[:2])]
    for name in ("transformer", "transformer_2"):
        if name not in names and hasattr(pipeline, name):
            names.append(name)
    found = []
    for name in sorted(dict.fromkeys(names), key=lambda n: (not n.startswith("transformer"), n)):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            found.append((name, module))
    return found


def call_signature(args: tuple, kwargs: dict) -> frozenset:
    """What a denoiser call passes: the names of its keyword arguments that are not None, and how many
    positional arguments. Calls within one step that differ in it are different computations."""
    return frozenset(k for k, v in kwargs.items() if v is not None) | {f"#{len(args)}"}


def extra_context_name(base: str, first: frozenset, now: frozenset) -> str:
    """The context of a call whose signature differs from the context's first call (``default+skip_layers``)."""
    changed = sorted(str(k).lstrip("#") for k in first ^ now)
    return f"{base}+{'+'.join(changed)}"


def loop_part(pipeline, component: str, length: int | None) -> tuple[int, int] | None:
    """``(first step, steps)`` of the pipeline's denoising loop of ``length`` steps that denoiser ``component``
    runs, where the pipeline splits its loop between two: Wan 2.2 (``config.boundary_ratio``) runs
    ``transformer`` while ``t >= boundary_ratio * num_train_timesteps`` and ``transformer_2`` after (the
    pipeline's own rule, on the scheduler's timesteps). None: the denoiser runs every step."""
    ratio = getattr(getattr(pipeline, "config", None), "boundary_ratio", None)
    scheduler = getattr(pipeline, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if (ratio is None or component not in ("transformer", "transformer_2") or timesteps is None
            or getattr(pipeline, "transformer_2", None) is None or getattr(pipeline, "transformer", None) is None):
        return None
    timesteps = timesteps[int(getattr(scheduler, "begin_index", None) or 0):]
    if length is not None and len(timesteps) != length:
        return None  # a loop over other steps than the scheduler's: the part is not known
    boundary = ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in timesteps if t >= boundary)
    return (0, high) if component == "transformer" else (high, len(timesteps) - high)
