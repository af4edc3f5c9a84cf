"""Where a sampling call starts and ends, seen from outside the model.

A cache's state belongs to one sampling call: it is reset when a call starts, and a forecast is never taken
across calls. Two things announce calls without touching the model's code: a diffusers pipeline's
``progress_bar`` (opened around its denoising loop, after the scheduler's timesteps are set), and diffusers'
own ``cache_context`` mechanism on models with ``CacheMixin`` (the context's name per cond/uncond call, its
step index, and a reset when the pipeline returns). Each installer returns its undo, so ``remove()`` leaves
the pipeline and the model as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.cache import ForecastCache

RELAY_HOOK = "taylorseer_context_relay"
_REGISTRY_ATTR = "_diffusers_hook"  # where diffusers' HookRegistry keeps itself on a module


def install_call_boundaries(pipeline, cache: ForecastCache, part: Callable | None = None) -> Callable[[], None]:
    """Every diffusers pipeline opens ``self.progress_bar(total=num_inference_steps)`` around its denoising loop,
    after the scheduler's timesteps are set: that call starts a sampling call (fresh state, its step count) and
    leaving it ends one. Wrapping the pipeline's ``progress_bar`` survives a replaced scheduler. ``part(length)``
    gives ``(first step, steps)`` where the denoiser runs only a part of the loop (Wan 2.2), or None. Returns the
    undo."""
    bound = pipeline.progress_bar

    def progress_bar(*args, **kwargs):
        length = _loop_length(pipeline, args, kwargs)
        found = part(length) if part is not None else None
        if found is None:
            cache.begin_call(length)
        else:
            cache.begin_call(found[1], first_step=found[0])
        return _CallBar(bound(*args, **kwargs), cache)

    return replace_attribute(pipeline, "progress_bar", progress_bar)


def replace_attribute(obj, name: str, value) -> Callable[[], None]:
    """Set ``obj.<name> = value`` on the instance; returns the undo, which restores the instance's own attribute
    or deletes ours so that the class's shows through again (no instance attribute is left behind)."""
    previous = obj.__dict__.get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if previous is None:
            delattr(obj, name)
        else:
            setattr(obj, name, previous)

    return undo


def _loop_length(pipeline, args: tuple, kwargs: dict) -> int | None:
    """Denoiser calls per context in this loop: the timesteps the loop iterates over.

    ``total`` is the pipeline's ``num_inference_steps``; a second-order scheduler calls the model
    ``len(timesteps)`` times (2N-1), and img2img loops start at the scheduler's ``begin_index``.
    """
    iterable = args[0] if args else kwargs.get("iterable")
    if iterable is not None and hasattr(iterable, "__len__"):
        return len(iterable)
    total = kwargs.get("total", args[1] if len(args) > 1 else None)
    scheduler = getattr(pipeline, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    counts = [int(total)] if total is not None else []
    if timesteps is not None and hasattr(timesteps, "__len__"):
        counts.append(len(timesteps) - int(getattr(scheduler, "begin_index", None) or 0))
    return max(counts) if counts else None


class _CallBar:
    """The pipeline's progress bar, unchanged, that ends the sampling call when the loop leaves it."""

    def __init__(self, bar, cache: ForecastCache):
        self._bar, self._cache = bar, cache

    def __enter__(self):
        return self._bar.__enter__()

    def __exit__(self, *exc):
        try:
            return self._bar.__exit__(*exc)
        finally:
            self._cache.end_call()

    def __iter__(self):
        try:
            yield from self._bar
        finally:
            self._cache.end_call()

    def __getattr__(self, name):
        return getattr(self._bar, name)


def register_diffusers_relay(model: torch.nn.Module, cache: ForecastCache) -> Callable[[], None] | None:
    """Relay diffusers' ``cache_context(name, step_index=..., num_inference_steps=...)`` and its end-of-pipeline
    reset to our cache. Returns the undo (which also drops a hook registry the model did not have before), or
    None where the model has no cache contexts."""
    if not hasattr(model, "cache_context"):
        return None
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import StateManager
    except ImportError:  # pragma: no cover - diffusers without hooks
        return None

    class _ContextRelay(StateManager):
        def __init__(self):
            super().__init__(object)

        def set_context(self, context) -> None:
            cache.set_context(getattr(context, "name", context), step_index=getattr(context, "step_index", None),
                              num_steps=getattr(context, "num_inference_steps", None))

        def reset(self, *args, **kwargs) -> None:
            cache.reset()

    class _RelayHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = _ContextRelay()

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    had_registry = _REGISTRY_ATTR in model.__dict__
    had_forward = "forward" in model.__dict__  # the registry wraps forward; its removal leaves the bound method
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_RelayHook(), RELAY_HOOK)

    def undo() -> None:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook(RELAY_HOOK, recurse=False)
        if not had_registry:
            delattr(model, _REGISTRY_ATTR)
        if not had_forward and "forward" in model.__dict__:
            del model.forward  # the class's forward shows through again

    return undo
