"""Attach the forecasting cache to named submodules of an unmodified model, and take it off again.

    cache = apply(model, CacheConfig(interval=4, max_order=2), modules=["blocks.*.attn", "blocks.*.mlp"])
    ...sample...                        # every call of `model` is one sampling step
    remove(model)                       # the model is exactly what it was

A cached module's ``forward`` is wrapped: on a full step it runs and its output updates the factors,
on a forecast step it does not run and the forecast is returned. A module whose cached feature is
not the output of one submodule (FLUX's single-stream branch) gets a model-specific forward through
``overrides`` instead; the cache object is the same.

With diffusers models the pipeline's ``transformer.cache_context("cond"/"uncond")`` selects the
cache context, and the reset diffusers performs at the end of every pipeline call clears the state.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .cache import ForecastCache
from .config import CacheConfig

_ATTR = "_taylorseer_attachment"
_DIFFUSERS_HOOK = "taylorseer_context_relay"

TimestepFn = Callable[[tuple, dict], "torch.Tensor | float | None"]
OverrideFactory = Callable[[torch.nn.Module, Callable, ForecastCache, str], Callable]


@dataclass
class _Attachment:
    cache: ForecastCache
    wrapped: list[tuple[torch.nn.Module, object]] = field(default_factory=list)  # (module, previous forward attr)
    handles: list = field(default_factory=list)
    diffusers_relay: bool = False


def apply(
    model: torch.nn.Module,
    config: CacheConfig,
    modules: Iterable[str] = (),
    *,
    overrides: Mapping[str, OverrideFactory] | None = None,
    num_steps: int | None = None,
    timestep_fn: TimestepFn | None = None,
    probe: str | None = None,
) -> ForecastCache:
    """Put a forecasting cache on ``model`` and return it.

    Args:
        model: the denoiser; each call of it is one sampling step (per cache context).
        config: the cache settings.
        modules: fnmatch patterns over ``model.named_modules()`` names whose outputs are cached,
            e.g. ``"blocks.*.attn"``. Each pattern must match at least one module.
        overrides: pattern -> factory(module, original_forward, cache, name) returning the forward
            to install, for branches that span several submodules.
        num_steps: steps per sampling call, when known: enables ``last_full_steps`` and restarts
            the schedule after that many calls even without an explicit ``reset``.
        timestep_fn: extracts the timestep from a model call's (args, kwargs); needed for
            ``step_distance="timestep"``. Defaults to the ``timestep``/``t`` argument.
        probe: exact name of the module ``schedule="adaptive"`` checks on every step (the model's
            first block, say), used when ``config.probe`` is not set. Ignored by the other schedules.
    """
    if hasattr(model, _ATTR):
        raise RuntimeError("a TaylorSeer cache is already attached to this model; call taylorseer.remove(model) first")
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a taylorseer.CacheConfig, got {type(config).__name__}")
    if isinstance(modules, str):
        modules = [modules]  # one pattern, not its characters
    # Everything is matched before anything is wrapped: a bad pattern leaves the model untouched.
    named = dict(model.named_modules())
    plain = _match(named, modules)
    special = [(name, module, factory) for pattern, factory in (overrides or {}).items()
               for name, module in _match(named, [pattern])]
    probe_module = _probe_module(named, config, probe)
    cache = ForecastCache(config, num_steps=num_steps)
    attachment = _Attachment(cache)
    for name, module in plain:
        _wrap_forward(attachment, module, functools.partial(cache.run, name, module.forward))
    for name, module, factory in special:
        _wrap_forward(attachment, module, factory(module, module.forward, cache, name))

    get_timestep = timestep_fn or _default_timestep

    def begin_step(_module, args, kwargs):
        timestep = get_timestep(args, kwargs) if config.step_distance == "timestep" else None
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.flatten()[0].item()
        cache.begin_step(timestep, _batch_size(args, kwargs))

    attachment.handles.append(model.register_forward_pre_hook(begin_step, with_kwargs=True))
    if probe_module is not None:  # schedule=adaptive: the probe's output decides the rest of the step
        attachment.handles.append(probe_module.register_forward_hook(lambda _m, _i, out: cache.observe_probe(out)))
    attachment.diffusers_relay = _register_diffusers_relay(model, cache)
    setattr(model, _ATTR, attachment)
    return cache


def remove(model: torch.nn.Module) -> None:
    """Detach the cache: every wrapped forward is restored and the state is dropped."""
    attachment: _Attachment | None = getattr(model, _ATTR, None)
    if attachment is None:
        return
    for module, previous in reversed(attachment.wrapped):
        if previous is None:
            del module.forward  # the class's forward shows through again
        else:
            module.forward = previous
    for handle in attachment.handles:
        handle.remove()
    if attachment.diffusers_relay:
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(model).remove_hook(_DIFFUSERS_HOOK, recurse=False)
    attachment.cache.reset()
    delattr(model, _ATTR)


def get_cache(model: torch.nn.Module) -> ForecastCache | None:
    attachment = getattr(model, _ATTR, None)
    return attachment.cache if attachment else None


def _match(named: dict[str, torch.nn.Module], patterns: Iterable[str]) -> list[tuple[str, torch.nn.Module]]:
    found = []
    for pattern in patterns:
        hits = [(n, m) for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = [n for n in named if n][:8]
            raise ValueError(f"no submodule matches {pattern!r}; module names look like {sample}")
        found.extend(hits)
    return found


def _probe_module(named: dict[str, torch.nn.Module], config: CacheConfig, default: str | None):
    """The module whose output the adaptive schedule checks (None for the other schedules)."""
    if config.schedule != "adaptive" or not config.enabled:
        return None
    name = config.probe or default
    if not name:
        raise ValueError("cache.schedule=adaptive needs a probe module: set cache.probe=<module name> (the model's "
                         "first block, e.g. blocks.0)")
    if name not in named or not name:
        close = [n for n in named if n and n.split(".")[0] == name.split(".")[0]][:8] or [n for n in named if n][:8]
        raise ValueError(f"cache.probe={name!r} is not a module of this model; names look like {close}")
    return named[name]


def _wrap_forward(attachment: _Attachment, module: torch.nn.Module, new_forward: Callable) -> None:
    attachment.wrapped.append((module, module.__dict__.get("forward")))
    module.forward = new_forward


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Batch size of a model call: the leading dimension of its first tensor input (``hidden_states``/``x``)."""
    first = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def _default_timestep(args: tuple, kwargs: dict):
    for key in ("timestep", "t"):
        if key in kwargs:
            return kwargs[key]
    return args[1] if len(args) > 1 else None


def _register_diffusers_relay(model: torch.nn.Module, cache: ForecastCache) -> bool:
    """Relay diffusers' ``cache_context(name)`` and its end-of-pipeline reset to our cache."""
    if not hasattr(model, "cache_context"):
        return False
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import StateManager
    except ImportError:  # pragma: no cover - diffusers without hooks
        return False

    class _ContextRelay(StateManager):
        def __init__(self):
            super().__init__(object)

        def set_context(self, context) -> None:
            cache.set_context(getattr(context, "name", context))

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

    HookRegistry.check_if_exists_or_initialize(model).register_hook(_RelayHook(), _DIFFUSERS_HOOK)
    return True
