"""A model without a preset: each block's forecast-step path, derived from its real inputs and verified.

``taylorseer.apply(model, config)`` on a transformer no preset serves puts a *verifier* on every block of its
block lists. On the block's first call (the first step, always computed) the verifier, with the real inputs:

1. traces the block (:mod:`taylorseer.attach.trace`) and writes a block description from the residual adds
   its children reach (*derived*: a short forecast-step forward, gates and the forecast folded into the add);
2. else caches the block's *branch modules*: its children that carry real work on the tokens (attention,
   feed-forward; not norms, not modulations of the conditioning), the block's own forward running around
   their forecasts on forecast steps; a module the block calls more than once gets one cached feature per call;
3. else runs the block uncached.

A candidate is trusted only once verified: on a scratch cache, a full step records the branch outputs and a
forecast step of order 0 (the forecast *is* what was just recorded) must reproduce the block's real output
to float rounding. ``taylorseer.summary(model)`` says, per block layout, which path it took and why.
Verifying costs two extra forwards of each block on the first step only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..core.cache import ForecastCache
from .attachment import block_lists
from .blocks import build_block
from .spec import BlockSpec, Branch
from .trace import _describe, trace_block

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")
LOG = logging.getLogger("taylorseer")
DERIVED, MODULES, UNCACHED = "derived description", "branch modules", "uncached"
_UNIT = ("attention", "feedforward", "mlp", "ffn", "moe")  # class names of modules that are one unit of work


def auto_blocks(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(layout label, block name, block) for every block of the model's top-level block lists."""
    found = []
    for path, blocks in block_lists(model):
        if "." in path or not _is_block(blocks[0]):  # nested lists run inside other modules; projections
            continue
        for i, block in enumerate(blocks):
            found.append((f"{path} ({type(block).__name__})", f"{path}.{i}", block))
    return found


def _is_block(module: torch.nn.Module) -> bool:
    """A transformer block has at least two children with parameters (norm, attention, feed-forward), or wraps
    one that has (HiDream); a list of projections is no list of blocks."""
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    return len(children) >= 2 or (len(children) == 1 and _is_block(children[0]))


@dataclass
class Derivation:
    """What the verifiers decided, block by block: ``(layout, path, detail)``."""

    blocks: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)  # block -> layout, not yet called

    def lines(self) -> list[str]:
        groups: dict[tuple[str, str, str], list[str]] = {}
        first: dict[tuple[str, str, str], str] = {}
        for name, (layout, path, detail) in self.blocks.items():
            key = (layout, path, re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", detail))  # blocks alike but for numbers
            groups.setdefault(key, []).append(name)
            first.setdefault(key, detail)
        pending: dict[str, int] = {}
        for layout in self.pending.values():
            pending[layout] = pending.get(layout, 0) + 1
        out = [f"{len(names)} x {layout}: {path}" + (f" ({first[key]})" if first[key] else "")
               for key, names in groups.items() for layout, path, _ in [key]]
        out += [f"{n} x {layout}: not yet called (decided on its first, always computed, step)"
                for layout, n in pending.items()]
        return out


class AutoBlock:
    """The forward installed on a block without a description: verifies, then runs the path it chose."""

    def __init__(self, name: str, layout: str, block: torch.nn.Module, cache: ForecastCache,
                 derivation: Derivation, wrap: Callable[[torch.nn.Module, Callable], None], skip_all: bool = False,
                 on_keys: Callable[[list[str]], None] | None = None):
        self.name, self.layout, self.block, self.cache = name, layout, block, cache
        self.derivation, self.wrap, self.skip_all = derivation, wrap, skip_all
        self.on_keys = on_keys or (lambda keys: None)
        self.original = block.forward  # before the verifier is installed
        self.chosen: Callable | None = None
        self.calls: dict[str, int] = {}  # per block call: how often each multiply-called module ran
        derivation.pending[name] = layout

    def __call__(self, *args, **kwargs):
        if self.chosen is None:
            if not self.cache.is_full:  # not reached in practice: a block's first call is on a full step
                return self.original(*args, **kwargs)
            self._decide(args, kwargs)
        self.calls.clear()
        return self.chosen(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ deciding
    def _decide(self, args, kwargs) -> None:
        self.chosen = self.original  # while probing, the block runs as it was
        self.derivation.pending.pop(self.name, None)
        try:
            probe = self._probe(args, kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of a probe means: run it uncached, say why
            self._settle(UNCACHED, f"tracing the block failed: {type(err).__name__}: {err}", self.original)
            return
        if self.skip_all:
            spec = BlockSpec((Branch(next(iter(probe.counts))),), returns=probe.returns or "hidden_states")
            forwards = self._build_spec(spec, self.cache, skip_all=True)
            self._settle("skipped on forecast steps (the bound)", "", forwards[0][1])
            return
        rejected = self._try_derived(probe, args, kwargs)
        if rejected is None:
            return
        rejected_modules = self._try_modules(probe, args, kwargs, rejected)
        if rejected_modules is None:
            return
        self._settle(UNCACHED, f"derived description: {rejected}; branch modules: {rejected_modules}", self.original)

    def _probe(self, args, kwargs) -> SimpleNamespace:
        """Trace one call (the branch marks, what the block returns), count its submodules' calls and see which
        take token tensors; the block's real output on these inputs."""
        counts: dict[str, int] = {}
        tokens: dict[str, bool] = {}
        handles = []
        for path, module in self.block.named_modules():
            if path and path.count(".") < 3:
                def pre(_m, a, k, path=path):
                    counts[path] = counts.get(path, 0) + 1
                    tokens[path] = tokens.get(path, False) or any(
                        isinstance(t, torch.Tensor) and t.dim() >= 3 for t in tree_flatten((a, k))[0])
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        verifier = self.block.__dict__.get("forward")
        self.block.forward = self.original  # the trace names the inputs from the block's own signature
        others = {attr: dict(getattr(self.block, attr)) for attr in _HOOK_DICTS}  # e.g. the adaptive probe's:
        for attr in _HOOK_DICTS:  # the traced call is no step of the model, so they do not see it
            getattr(self.block, attr).clear()
        try:
            found, _inner, returns = trace_block(None, self.block, lambda: self.block(*_copy(args), **_copy(kwargs)))
        finally:
            for handle in handles:
                handle.remove()
            for attr, hooks in others.items():
                getattr(self.block, attr).update(hooks)
            if verifier is None:
                del self.block.forward
            else:
                self.block.forward = verifier
        per_call = {p: c for p, c in counts.items()}  # the block ran once under the trace
        with torch.no_grad():
            real = self.original(*_copy(args), **_copy(kwargs))
        return SimpleNamespace(marks=found, returns=returns, counts=per_call, tokens=tokens, real=real)

    def _try_derived(self, probe, args, kwargs) -> str | None:
        children = [SimpleNamespace(name=n, marks=[m for key, m in probe.marks.items() if key[0] == n])
                    for n, _ in self.block.named_children()]
        try:
            spec, text = _describe(children, probe.returns)
        except Exception as err:  # noqa: BLE001
            return f"could not be written ({type(err).__name__}: {err})"
        if spec is None:
            return text.lstrip("# ") if text else "no residual branch traced"
        work = work_modules(self.block, probe.counts, probe.tokens)
        held, wanted = _params(self.block, spec.modules), _params(self.block, work)
        if held < 0.5 * wanted:
            return (f"its branches ({', '.join(spec.modules)}) hold {100 * held / max(wanted, 1):.0f}% of the "
                    f"parameters of the block's work ({', '.join(work)}): a forecast step would still run the work")
        twice = [m for m in spec.modules if probe.counts.get(m, 0) != 1]
        if twice:
            return f"{', '.join(twice)} run(s) {probe.counts.get(twice[0], 0)}x per block call"
        try:
            error = self._verify(lambda cache: self._build_spec(spec, cache), probe.real, args, kwargs)
        except Exception as err:  # noqa: BLE001
            return f"failed at the forecast step ({type(err).__name__}: {str(err)[:120]})"
        if error is not None:
            return error
        built = self._build_spec(spec, self.cache)
        self._install(built)
        share = ", ".join(spec.modules)
        self._settle(DERIVED, f"{share}; verified", self.chosen)
        return None

    def _try_modules(self, probe, args, kwargs, rejected: str) -> str | None:
        modules = work_modules(self.block, probe.counts, probe.tokens)
        if not modules:
            return "no child carries work on the tokens"
        try:
            error = self._verify(lambda cache: self._build_modules(modules, probe.counts, cache), probe.real,
                                 args, kwargs)
        except Exception as err:  # noqa: BLE001
            return f"failed at the forecast step ({type(err).__name__}: {str(err)[:120]})"
        if error is not None:
            return error
        self._install(self._build_modules(modules, probe.counts, self.cache))
        shown = ", ".join(f"{m} ({probe.counts[m]}x)" if probe.counts[m] > 1 else m for m in modules)
        self._settle(MODULES, f"{shown}; verified; derived description not used: {rejected}", self.chosen)
        return None

    # ------------------------------------------------------------------------------------------ building
    def _build_spec(self, spec: BlockSpec, cache: ForecastCache,
                    skip_all: bool = False) -> list[tuple[torch.nn.Module, Callable]]:
        saved = self.block.__dict__.get("forward")
        self.block.forward = self.original  # the description's short forward wraps the block's own
        try:
            return build_block(self.block, self.name, spec, cache, skip_all=skip_all).forwards
        finally:
            if saved is None:
                del self.block.forward
            else:
                self.block.forward = saved

    def _build_modules(self, modules: list[str], counts: dict, cache: ForecastCache):
        forwards = []
        for path in modules:
            module = self.block.get_submodule(path)
            key = f"{self.name}.{path}"
            if counts[path] == 1:
                forwards.append((module, functools.partial(cache.run, key, module.forward)))
            else:
                forwards.append((module, _per_call(cache, key, module.forward, self.calls, path)))
        return forwards

    def _verify(self, build, real, args, kwargs) -> str | None:
        """None when the candidate reproduces ``real`` from the branch outputs it recorded, else why not."""
        config = dataclasses.replace(self.cache.config, interval=2, max_order=0, first_enhance=1, last_full_steps=0,
                                     schedule="interval", enabled=True, offload=False, prefetch=False,
                                     factor_dtype="float32", factor_store="dense", probe=None)
        scratch = ForecastCache(config, num_steps=2)
        forwards = build(scratch)
        outs = []
        for _ in range(2):  # a full step that records, then a forecast step of order 0
            scratch.begin_step()
            outs.append(self._run_with(forwards, args, kwargs))
        for label, out in (("full step", outs[0]), ("forecast step", outs[1])):
            error = _mismatch(out, real)
            if error is not None:
                return f"{label}: {error}"
        return None

    def _run_with(self, forwards, args, kwargs):
        block_forward = next((f for m, f in forwards if m is self.block), self.original)
        saved = [(m, m.__dict__.get("forward")) for m, _ in forwards if m is not self.block]
        for m, f in forwards:
            if m is not self.block:
                m.forward = f
        self.calls.clear()
        try:
            with torch.no_grad():
                return block_forward(*_copy(args), **_copy(kwargs))
        finally:
            for m, previous in saved:
                if previous is None:
                    del m.forward
                else:
                    m.forward = previous

    def _install(self, forwards) -> None:
        keys = []
        for module, forward in forwards:
            if module is self.block:
                self.chosen = forward
            else:
                self.wrap(module, forward)
        for _module, forward in forwards:
            if isinstance(forward, functools.partial):
                keys.append(forward.args[0])
            elif hasattr(forward, "key"):
                keys.append(forward.key)
        self.on_keys(keys)

    def _settle(self, path: str, detail: str, forward: Callable) -> None:
        self.chosen = forward
        detail = detail.replace(self.name, "<block>")
        self.derivation.blocks[self.name] = (self.layout, path, detail)
        line = f"taylorseer: {self.name} ({self.layout}): {path}" + (f" ({detail})" if detail else "")
        if path == UNCACHED:
            warnings.warn(line, stacklevel=2)  # never silent: the block runs every step
        else:
            LOG.info(line)


def _per_call(cache: ForecastCache, key: str, forward: Callable, calls: dict, path: str) -> Callable:
    """A module the block calls several times: its i-th call of a block call is the feature ``key#i``."""

    def run(*args, **kwargs):
        i = calls.get(path, 0)
        calls[path] = i + 1
        return cache.run(f"{key}#{i}", forward, *args, **kwargs)

    run.key = f"{key}#*"
    return run


def work_modules(block: torch.nn.Module, counts: dict[str, int], tokens: dict[str, bool]) -> list[str]:
    """The submodules of ``block`` that carry its work on the tokens: a wrapper child holding nearly all of the
    block is looked into; norms, modulations (no token input) and modules below 2% of the block are left out."""
    total = sum(p.numel() for p in block.parameters()) or 1
    found: list[str] = []

    def visit(module: torch.nn.Module, prefix: str) -> None:
        inside = sum(p.numel() for p in module.parameters()) or 1
        for name, child in module.named_children():
            path = prefix + name
            params = sum(p.numel() for p in child.parameters())
            kind = type(child).__name__.lower()
            if not params or not counts.get(path):
                continue
            if params >= 0.9 * inside and len(list(child.children())) > 1 and not any(u in kind for u in _UNIT):
                visit(child, path + ".")
                continue
            if "norm" in name.lower() or "norm" in kind or not tokens.get(path) or params < 0.02 * total:
                continue
            found.append(path)

    visit(block, "")
    return found


def _params(block: torch.nn.Module, paths) -> int:
    return sum(p.numel() for path in paths for p in block.get_submodule(path).parameters())


def _copy(tree):
    """The inputs again, tensors cloned: a block that writes into its inputs cannot spoil the next run."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def _mismatch(out, real) -> str | None:
    got, _ = tree_flatten(out)
    want, _ = tree_flatten(real)
    got = [t for t in got if isinstance(t, torch.Tensor)]
    want = [t for t in want if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        return f"returns {len(got)} tensors, the block {len(want)}"
    for a, b in zip(got, want, strict=True):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        if not b.is_floating_point():
            if not torch.equal(a, b):
                return "differs"
            continue
        scale = b.detach().abs().max().float().item() or 1.0
        error = (a.detach().float() - b.detach().float()).abs().max().item() / scale
        tolerance = 1e-5 if b.dtype in (torch.float32, torch.float64) else 2e-2
        if not error <= tolerance:
            return f"output off by {error:.1e} of its scale (tolerance {tolerance:.0e})"
    return None
