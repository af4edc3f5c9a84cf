"""Attach the forecasting cache to an unmodified model or pipeline, and take it off again.

    cache = apply(pipe, CacheConfig(interval=5, max_order=1, first_enhance=1))   # preset from the class
    images = pipe(prompt).images                      # each denoiser call is one step (per cache context)
    remove(pipe)                                      # the model is exactly what it was

What is cached comes from, in order: ``blocks`` (block descriptions, :mod:`taylorseer.attach.blocks`), ``modules``
(fnmatch patterns of plain cached modules: computed + recorded on full steps, forecast otherwise),
``overrides`` (pattern -> forward factory), or else the family preset of the model's class
(:mod:`taylorseer.presets`). A described block gets a short forward on forecast steps (gates, then the
forecast folded into the residual add); its branch modules record on full steps.

Call boundaries: given a pipeline, every denoising loop it runs is one sampling call (fresh state, its
step count from the pipeline); diffusers models also relay ``cache_context(name, step_index=...)`` and the
end-of-call reset. See :meth:`taylorseer.core.cache.ForecastCache.begin_step` for what happens without them.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..core.cache import ForecastCache
from ..core.config import CacheConfig
from . import presets as preset_registry
from .attachment import AttachSummary, children_hint
from .blocks import BlockSpec, build_block, check_inputs
from .boundaries import install_call_boundaries, register_diffusers_relay, replace_attribute
from .collapse import Collapser
from .derive import AutoBlock, Derivation, auto_blocks
from .pipelines import call_signature, denoisers, extra_context_name, loop_part

_ATTR = "_taylorseer_attachment"

TimestepFn = Callable[[tuple, dict], "torch.Tensor | float | None"]
OverrideFactory = Callable[[torch.nn.Module, Callable, ForecastCache, str], Callable]
BlockDescription = "BlockSpec | Callable[[torch.nn.Module], BlockSpec | None]"


@dataclass
class _Attachment:
    cache: ForecastCache
    undo: list[Callable[[], None]] = field(default_factory=list)  # run in reverse by remove()
    summary: AttachSummary | None = None


@dataclass
class _Plan:
    """What :func:`apply` will install, all matched and built before anything is wrapped (a bad description
    leaves the model untouched)."""

    preset: preset_registry.Preset | None
    specs: dict[str, BlockSpec]
    plain: list[tuple[str, torch.nn.Module]]
    special: list[tuple[str, torch.nn.Module, OverrideFactory]]
    installs: list[tuple[torch.nn.Module, Callable]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    auto: list[tuple[str, str, torch.nn.Module]] = field(default_factory=list)  # derived and verified on step 0


def apply(
    target,
    config: CacheConfig,
    modules: Iterable[str] = (),
    *,
    blocks: Mapping[str, BlockDescription] | None = None,
    preset: str | preset_registry.Preset | None = "auto",
    overrides: Mapping[str, OverrideFactory] | None = None,
    num_steps: int | None = None,
    timestep_fn: TimestepFn | None = None,
    skip_all: bool = False,
    verbose: bool = False,
    probe: str | None = None,
) -> ForecastCache:
    """Put a forecasting cache on ``target`` (a model, or a diffusers pipeline: its ``.transformer``) and return it.

    Args:
        target: the denoiser (each call of it is one sampling step per cache context), or a pipeline.
        config: the cache settings.
        modules: fnmatch patterns over ``named_modules()`` names of plain cached modules, e.g.
            ``"blocks.*.attn"``. Each must match; a pattern that also matches modules inside another matched
            module (``"blocks.*"``, ``"*attn*"``) is refused (it would cache the same work several times).
        blocks: explicit descriptions: the name of a ``ModuleList`` of blocks (every element) or of one block
            -> a :class:`~taylorseer.blocks.BlockSpec`, or a function ``block -> BlockSpec | None``.
        preset: ``"auto"`` finds the family preset from the model's class when nothing explicit is given; a
            preset name (``"wan"``) or :func:`taylorseer.presets.get` result forces one; None uses none; ``"derive"``
            derives each block's path on the first step and verifies it (what a class without a preset gets).
        overrides: pattern -> factory(module, original_forward, cache, name) returning the forward to install.
        num_steps: steps per sampling call when known and no pipeline says it: enables ``last_full_steps``,
            and a call that runs past it is an error (a new call that nobody announced restarts the schedule).
        timestep_fn: extracts the timestep from a model call's (args, kwargs); defaults to the
            ``timestep``/``t`` argument. Used by ``step_distance="timestep"`` and to tell calls apart.
        skip_all: the bound a cache is measured against: described blocks return their inputs on forecast
            steps and nothing is recorded (wrong outputs, for timing only).
        verbose: print what was wrapped (also available as ``taylorseer.summary(target)``).
        probe: exact name of the module ``schedule="adaptive"`` checks on every step, used when ``config.probe``
            is not set; default: the first cached block in the model's module order. Ignored by other schedules.
    """
    models, pipeline = _resolve_all(target)
    caches, done = [], []
    try:
        for model in models:
            caches.append(_apply_one(model, pipeline, config, modules, blocks, preset, overrides, num_steps,
                                     timestep_fn, skip_all, probe))
            done.append(model)
    except BaseException:
        for model in reversed(done):
            remove(model)
        raise
    first = getattr(models[0], _ATTR)
    first.summary.others = [getattr(m, _ATTR).summary for m in models[1:]]
    if verbose:
        print(first.summary.describe())
    return caches[0]


def _apply_one(model, pipeline, config, modules, blocks, preset, overrides, num_steps, timestep_fn, skip_all,
               probe) -> ForecastCache:
    """:func:`apply` on one denoiser (``pipeline``: the pipeline it belongs to, or None)."""
    if hasattr(model, _ATTR):
        raise RuntimeError("a TaylorSeer cache is already attached to this model; call taylorseer.remove(model) first")
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a taylorseer.CacheConfig, got {type(config).__name__}")
    if config.last_full_steps and num_steps is None and pipeline is None:
        raise ValueError(f"cache.last_full_steps={config.last_full_steps} needs the number of sampling steps: pass "
                         f"num_steps=... to taylorseer.apply, or apply it to the pipeline (which gives the count)")
    cache = ForecastCache(config, num_steps=num_steps)
    # On a context-parallel model (attach.parallel.enable) the adaptive probe error is summed over the ranks.
    cache.error_reducer = getattr(getattr(model, "_taylorseer_context_parallel", None), "reduce_sums", None)
    named = dict(model.named_modules())
    plan = _plan(model, named, cache, [modules] if isinstance(modules, str) else list(modules), blocks, preset,
                 overrides, skip_all)
    probe_module = _probe_module(named, config, probe or _first_block(
        named, list(plan.specs) + [n for n, _, _ in plan.special] + [n for _, n, _ in plan.auto],
        [n for n, _ in plan.plain]))

    attachment = _Attachment(cache)
    for module, forward in plan.installs:
        _wrap_forward(attachment, module, forward)
    derivation = Derivation() if plan.auto else None
    for layout, name, block in plan.auto:
        verifier = AutoBlock(name, layout, block, cache, derivation, functools.partial(_wrap_forward, attachment),
                             skip_all=skip_all, on_keys=plan.keys.extend)
        _wrap_forward(attachment, block, verifier)
    if cache.collapser is not None:
        cache.collapser.planned(plan.specs, probe_module, named)  # per_stream: what stays per branch, and why
    _install_step_hooks(attachment, model, timestep_fn or _default_timestep, probe_module)
    relay = register_diffusers_relay(model, cache)
    if relay is not None:
        attachment.undo.append(relay)
    if pipeline is not None and callable(getattr(pipeline, "progress_bar", None)):
        component = next((n for n, m in denoisers(pipeline) if m is model), None)
        attachment.undo.append(install_call_boundaries(
            pipeline, cache, functools.partial(loop_part, pipeline, component)))
    elif num_steps is None and relay is None:
        # Nothing will announce a new sampling call: watch the timestep go back to its start instead.
        cache.watch_timesteps = True
    attachment.summary = AttachSummary.collect(model, cache, plan.preset.name if plan.preset else None, plan.specs,
                                               plan.keys, [n for n, _ in plan.plain],
                                               [n for n, _, _ in plan.special], skip_all)
    attachment.summary.keys = plan.keys  # the verifiers add theirs on the first step
    attachment.summary.derivation = derivation
    setattr(model, _ATTR, attachment)
    return cache


def _plan(model, named: dict, cache: ForecastCache, modules: list[str], blocks, preset, overrides,
          skip_all: bool) -> _Plan:
    """Choose the descriptions (preset or explicit), match the patterns and build every forward to install."""
    chosen = _choose_preset(model, preset, explicit=bool(modules or blocks or overrides))
    derive = chosen is _DERIVE
    if derive:
        chosen = None
    if (preset == "auto" and chosen is not None and chosen.name == "hunyuan_video"
            and cache.config.forecast_step in ("collapsed", "per_stream")):
        # Found from the class: short double blocks and no text forecast give the same video up to float rounding,
        # with far less work. forecast_step=per_block, or a preset asked for by name or object (the HunyuanVideo
        # app's attach, whose estimates and tests count upstream's modules), keeps upstream's plain double blocks.
        chosen = preset_registry.get("hunyuan_video", **chosen.options, lean=True)
    plan = _Plan(
        preset=chosen,
        specs=chosen.blocks(model) if chosen is not None else _explicit_blocks(model, named, blocks or {}),
        plain=[] if skip_all else _match(model, named, modules, refuse_nested=True),
        special=[] if skip_all else [(name, module, factory) for pattern, factory in (overrides or {}).items()
                                     for name, module in _match(model, named, [pattern])],
    )
    collapsing = cache.config.forecast_step in ("collapsed", "per_stream")
    collapser = Collapser(cache) if collapsing and not skip_all else None
    cache.collapser = collapser
    for name, spec in plan.specs.items():
        block = named[name]
        check_inputs(block, name, spec)
        built = build_block(block, name, spec, cache, skip_all=skip_all, collapser=collapser)
        plan.installs += built.forwards
        plan.keys += built.keys
    for name, module in plan.plain:
        plan.installs.append((module, functools.partial(cache.run, name, module.forward)))
        plan.keys.append(name)
    for name, module, factory in plan.special:
        plan.installs.append((module, factory(module, module.forward, cache, name)))
    _refuse_double_wraps(plan.installs, named)
    if derive:
        plan.auto = auto_blocks(model)
        if not plan.auto:
            raise ValueError(f"no TaylorSeer preset for {type(model).__name__} and no list of blocks to derive one "
                             f"for; list plain modules (modules=['<name>', ...]); `python -m "
                             f"taylorseer.attach.discover "
                             f"{type(model).__name__}` lists the candidates. {children_hint(model)}")
    if not plan.installs and not plan.auto:
        raise ValueError("nothing to cache: give modules=[...], blocks={...} or a preset")
    return plan


def _install_step_hooks(attachment: _Attachment, model, get_timestep: TimestepFn, probe_module) -> None:
    """Each model call begins a step; under ``schedule=adaptive`` the probe's output decides the rest of it."""
    cache, config = attachment.cache, attachment.cache.config
    signatures: dict[str, frozenset] = {}  # context -> what its first call passed
    restore: list[str] = []

    def begin_step(_module, args, kwargs):
        _route_extra_call(cache, signatures, restore, args, kwargs)
        raw = get_timestep(args, kwargs)
        timestep = None
        if config.step_distance == "timestep" and raw is not None:
            timestep = raw.flatten()[0].item() if isinstance(raw, torch.Tensor) else float(raw)
        cache.begin_step(timestep, _batch_size(args, kwargs), timestep_ref=raw)

    def end_step(_module, _args, _out):
        if cache.collapser is not None:
            cache.collapser.end_step()  # per_stream: the run still open ends with the call
        if restore:
            cache.context_name = restore.pop()

    handles = [model.register_forward_pre_hook(begin_step, with_kwargs=True),
               model.register_forward_hook(end_step, always_call=True)]
    if probe_module is not None:
        handles.append(probe_module.register_forward_hook(lambda _m, _i, out: cache.observe_probe(out)))
    attachment.undo += [handle.remove for handle in handles]


def _route_extra_call(cache: ForecastCache, signatures: dict, restore: list, args, kwargs) -> None:
    """A call whose arguments differ from its context's first call (SD3.5's skip-layer guidance adds
    ``skip_layers``), or a second call at a step index the pipeline already announced, runs in its own context."""
    base = cache.context_name
    signature = call_signature(args, kwargs)
    first = signatures.setdefault(base, signature)
    name = base if signature == first else extra_context_name(base, first, signature)
    announced = cache._announced_step
    known = cache._contexts.get(name)
    if announced is not None and known is not None and 0 < announced <= known.step:
        name = f"{name}+again"
    if name != base:
        cache.context_name = name  # the announced step index stays for this call
        restore.append(base)


def remove(target) -> None:
    """Detach the cache: every wrapped forward is restored, the pipeline's and diffusers' hooks too, and the state
    is dropped (every denoiser of a pipeline)."""
    for model in reversed(_resolve_all(target)[0]):
        _remove_one(model)


def _remove_one(model) -> None:
    attachment: _Attachment | None = getattr(model, _ATTR, None)
    if attachment is None:
        return
    for undo in reversed(attachment.undo):
        undo()
    attachment.cache.reset()
    delattr(model, _ATTR)


def get_cache(target) -> ForecastCache | None:
    model, _ = _resolve(target)
    attachment = getattr(model, _ATTR, None)
    return attachment.cache if attachment else None


def summary(target) -> AttachSummary | None:
    """What :func:`apply` wrapped on ``target`` and the bytes its cache holds / will hold."""
    model, _ = _resolve(target)
    attachment = getattr(model, _ATTR, None)
    return attachment.summary if attachment else None


# ------------------------------------------------------------------------------------------ resolving
def _resolve_all(target) -> tuple[list[torch.nn.Module], object]:
    """(every denoiser, pipeline or None): a pipeline's ``transformer``, ``transformer_2``, ..."""
    if isinstance(target, torch.nn.Module):
        return [target], None
    found = denoisers(target)
    if not found:
        _resolve(target)  # raises the error
    return [module for _, module in found], target


def _resolve(target) -> tuple[torch.nn.Module, object]:
    """(model, pipeline or None): a diffusers pipeline is cached through its ``transformer``."""
    if isinstance(target, torch.nn.Module):
        return target, None
    found = denoisers(target)
    if found:
        return found[0][1], target
    detail = " whose transformer is None" if hasattr(target, "transformer") else ""
    raise TypeError(f"expected a torch.nn.Module or a diffusers pipeline with a .transformer, got "
                    f"{type(target).__name__}{detail}")


_DERIVE = "derive"  # no preset: derive and verify on the first step


def _choose_preset(model, preset, explicit: bool) -> preset_registry.Preset | str | None:
    if preset is None or (preset == "auto" and explicit):
        return None
    if explicit:
        raise ValueError("give either a preset or an explicit description (modules/blocks/overrides), not both")
    if isinstance(preset, preset_registry.Preset):
        return preset
    if preset == _DERIVE:
        return _DERIVE
    if preset != "auto":
        return preset_registry.get(preset)
    found = preset_registry.find(model)
    if found is None:
        return _DERIVE  # each block's path derived from its real inputs and verified (taylorseer.attach.derive)
    return found


def _explicit_blocks(model, named: dict, blocks: Mapping) -> dict[str, BlockSpec]:
    """{path of a ModuleList or of a block: description} -> {block name: BlockSpec}."""
    specs: dict[str, BlockSpec] = {}
    for path, description in blocks.items():
        if path not in named or not path:
            raise ValueError(f"blocks={{{path!r}: ...}}: no such module. {children_hint(model)}")
        target = named[path]
        members = ([(f"{path}.{i}", b) for i, b in enumerate(target)] if isinstance(target, torch.nn.ModuleList)
                   else [(path, target)])
        for name, block in members:
            spec = description if isinstance(description, BlockSpec) else description(block)
            if spec is None:
                continue
            if not isinstance(spec, BlockSpec):
                raise TypeError(f"blocks[{path!r}] must be a BlockSpec or a function returning one, got "
                                f"{type(spec).__name__}")
            specs[name] = spec
    return specs


def _match(model, named: dict[str, torch.nn.Module], patterns: Iterable[str],
           refuse_nested: bool = False) -> list[tuple[str, torch.nn.Module]]:
    found = []
    for pattern in patterns:
        hits = [(n, m) for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"no submodule matches {pattern!r}. {children_hint(model)}")
        found.extend(hits)
    if refuse_nested:
        _refuse_nested(model, found, patterns)
    return found


def _refuse_nested(model, found: list[tuple[str, torch.nn.Module]], patterns) -> None:
    """fnmatch's ``*`` crosses dots: ``blocks.*`` also matches ``blocks.0.attn``, ``blocks.0.attn.to_q`` ...
    Caching a module and modules inside it stores the inner features for nothing (5-7x the memory)."""
    names = sorted({n for n, _ in found})
    nested = [(outer, inner) for outer in names for inner in names if inner.startswith(outer + ".")]
    if nested:
        outer, inner = nested[0]
        inner_count = len({i for _, i in nested})
        raise ValueError(
            f"the patterns {list(patterns)} match modules inside other matched modules ({outer!r} and {inner!r}, "
            f"{inner_count} nested in all): fnmatch's '*' crosses dots, so both would be cached and the inner "
            f"features stored for nothing. Match one level, e.g. '<blocks>.*.attn1' with the child's name. "
            f"{children_hint(model)}")


def _refuse_double_wraps(installs: list[tuple[torch.nn.Module, Callable]], named: dict) -> None:
    names = {id(m): n for n, m in named.items()}
    seen: set[int] = set()
    for module, _ in installs:
        if id(module) in seen:
            raise ValueError(f"{names.get(id(module), type(module).__name__)!r} is cached twice (by a preset or block "
                             f"description and by modules/overrides): give it once")
        seen.add(id(module))


def _first_block(named: dict[str, torch.nn.Module], blocks: list[str], plain: list[str]) -> str | None:
    """The default probe: the block that holds the model's first cached work, a described or overridden block
    or the parent of a plain cached module (``transformer_blocks.0`` for ``transformer_blocks.0.attn``)."""
    candidates = blocks + [n.rsplit(".", 1)[0] if "." in n else n for n in plain]
    if not candidates:
        return None
    order = {name: i for i, name in enumerate(named)}
    return min(candidates, key=lambda n: order.get(n, len(order)))


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
    attachment.undo.append(replace_attribute(module, "forward", new_forward))


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """Batch size of a model call: the leading dimension of its first tensor input (``hidden_states``/``x``)."""
    first = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None


def _default_timestep(args: tuple, kwargs: dict):
    for key in ("timestep", "t"):
        if key in kwargs:
            return kwargs[key]
    return args[1] if len(args) > 1 else None


def count_cache_bytes(model: torch.nn.Module, attach, call, config) -> int:
    """Bytes ``model``'s cache holds once all O+1 factors of every cached tensor are filled (one context).

    ``attach(config)`` puts the model's cache on ``model``; ``call()`` runs one model call. On the ``meta``
    device a full-size model costs no memory and no time, and the factors' byte counts are the real ones.
    Every step is computed here (interval 1, derivatives from the first step), so O+1 calls fill every
    order; the cache is taken off ``model`` afterwards.
    """
    import dataclasses

    fill = dataclasses.replace(config, interval=1, first_enhance=1, last_full_steps=0, enabled=True)
    attach(fill)
    try:
        cache = get_cache(model)
        cache.reset(num_steps=fill.max_order + 1)
        with torch.no_grad():
            for _ in range(fill.max_order + 1):
                call()
        return cache.nbytes()
    finally:
        remove(model)
