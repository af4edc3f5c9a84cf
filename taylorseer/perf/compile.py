"""``torch.compile`` with the forecasting cache on: regional compilation that never sees the cache.

    cache = taylorseer.apply(model, config, ...)      # or a model folder's attach function
    taylorseer.compile(model)                         # after the cache: compiles what a full step computes
    ...sample...
    taylorseer.uncompile(model)                       # the eager model again (also before taylorseer.remove)

Why not ``torch.compile(model)``: the cache decides per step in Python (step counters, which module's
factors, the Taylor weights), and dynamo specialises on all of it: a whole-model compile recompiles at
every step and every block (each block's factor names are different constants) until it hits its
recompile limit and silently runs eager. So, as diffusers' ``compile_repeated_blocks`` does, only the
repeated blocks are compiled, one compiled function per block *class* shared by every instance, and the
cache's own code is kept out of the graphs:

* a block the cache does not touch (the cache off, or a block without cached parts) is compiled whole;
* in a block the cache touches, the block's glue stays eager and its parts are compiled: each cached
  module's own computation (the function the cache calls on a full step), and every other child that
  does real work (attention, norms with modulation, MLPs), except bare ``torch.nn`` leaves (a lone
  Linear or activation gains nothing);
* forecast steps run the short forwards eagerly; their gated adds use the fused kernels of
  :mod:`taylorseer.core.kernels`, compiled separately.

Nothing compiled reads the step, so the number of compilations depends on the block classes and
shapes, never on the number of steps (counted in ``tests/test_compile.py``).
"""

from __future__ import annotations

import functools
import types
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..core.cache import ForecastCache

_ATTR = "_taylorseer_compiled"


@dataclass
class CompileReport:
    """What :func:`compile` compiled: ``regions`` module names, ``classes`` the compiled forwards."""

    regions: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    cached_parts: int = 0  # cached modules whose full-step computation is compiled


def compile(model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None,
            fullgraph: bool = False, backend: str = "inductor") -> CompileReport:  # noqa: A001
    """Compile ``model``'s repeated blocks regionally (see the module docstring); returns what was compiled.

    Call it after the cache is attached (a cache attached afterwards would wrap compiled blocks and be
    traced with them). ``mode``/``dynamic``/``fullgraph``/``backend`` go to ``torch.compile``
    (``mode="max-autotune-no-cudagraphs"`` for autotuned matmuls; CUDA graphs do not fit a step that
    changes between full and forecast).
    """
    uncompile(model)
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile (no `_repeated_blocks` and no "
                         f"ModuleList of one block class); compile its blocks yourself")
    compiled_classes: dict[type, object] = {}

    def compiled_forward(module: torch.nn.Module):
        cls = type(module)
        if cls not in compiled_classes:
            compiled_classes[cls] = torch.compile(cls.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph,
                                                  backend=backend)
        return types.MethodType(compiled_classes[cls], module)

    names = {id(m): n for n, m in model.named_modules()}
    undo: list[tuple[torch.nn.Module, object]] = []
    report = CompileReport()
    for block in blocks:
        _compile_region(block, compiled_forward, undo, report, names)
    report.classes = sorted(c.__name__ for c in compiled_classes)
    setattr(model, _ATTR, undo)
    return report


def uncompile(model: torch.nn.Module) -> None:
    """Undo :func:`compile` (nothing happens on a model that was not compiled)."""
    for module, previous in reversed(getattr(model, _ATTR, [])):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: diffusers' ``_repeated_blocks`` class names, else every ModuleList of one class."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    out = []
    for child in model.modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            out.extend(child)
    return out


def _cache_call(module: torch.nn.Module) -> functools.partial | None:
    """The forward a cache installed on a plainly cached module: ``partial(cache.run, name, original)``."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and isinstance(getattr(forward.func, "__self__", None), ForecastCache):
        return forward
    return None


def _touched(module: torch.nn.Module) -> bool:
    """Whether anything in ``module``'s subtree has a forward replaced by someone (the cache, an override)."""
    return any("forward" in m.__dict__ for m in module.modules())


def _worth_compiling(module: torch.nn.Module) -> bool:
    # A bare torch.nn leaf is one kernel already; anything with children or its own code may fuse.
    return bool(list(module.children())) or not type(module).__module__.startswith("torch.nn")


def _compile_region(module, compiled_forward, undo, report, names) -> None:
    call = _cache_call(module)
    if call is not None:
        if _worth_compiling(module) and not _touched_below(module):
            # The cache calls call.args[1] on a full step: make that the compiled class forward.
            module.forward = functools.partial(call.func, call.args[0], compiled_forward(module), *call.args[2:],
                                               **call.keywords)
            undo.append((module, call))
            report.regions.append(names.get(id(module), type(module).__name__))
            report.cached_parts += 1
        return
    if not _touched(module):
        if _worth_compiling(module):
            module.forward = compiled_forward(module)
            undo.append((module, None))
            report.regions.append(names.get(id(module), type(module).__name__))
        return
    for child in module.children():
        _compile_region(child, compiled_forward, undo, report, names)


def _touched_below(module: torch.nn.Module) -> bool:
    return any("forward" in m.__dict__ for m in module.modules() if m is not module)


def graph_count() -> int:
    """Graphs dynamo has compiled in this process (``torch._dynamo.utils.counters``): read it before and
    after a sampling call to count (re)compilations."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def region_summary(report: CompileReport) -> str:
    kinds = Counter(r.split(".")[-1] if "." in r else r for r in report.regions)
    return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
