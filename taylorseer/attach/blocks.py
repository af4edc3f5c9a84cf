"""Describe a transformer block as residual branches; the core derives the rest.

An adaLN-Zero block (DiT, FLUX, SD3, Wan, PixArt, HunyuanVideo, CogVideoX) updates each of its residual
streams as ``x <- x + g_b * B_b(...)`` for its branches ``b`` (attention, cross-attention, MLP), with gates
``g_b`` from a modulation of the conditioning (or ``g_b = 1``: Wan's and PixArt's cross-attention). TaylorSeer
caches the pre-gate branch outputs ``B_b`` (paper section 3; docs/method.md), so on a forecast step the
block reduces to

    x_out = x + sum_b g_b * F_b,      F_b = sum_i c_i D_{b,i}   (the Taylor forecast, paper eq. 7-8)

From a :class:`BlockSpec` the core builds both halves of that:

* what to record on a full step: each branch module's output (or the elements / token parts of it that
  a forecast step reads), through a wrapper on the module's ``forward``;
* the short forward of a forecast step: only the gate rows of the modulation are read
  (:func:`taylorseer.attach.spec.modulation_chunk`), the forecast is folded into the residual add
  (:func:`taylorseer.core.kernels.gated_add`, one pass per factor), and nothing else of the block runs.

A stream no branch is listed for passes through unchanged: FLUX's and SD3's text tokens are read on a
forecast step by nothing (no attention runs, the output reads the image tokens), so their presets list
the image-stream branches only. ``short=False`` keeps the block's own forward on forecast steps (the
branch modules then return their forecasts), for blocks with work outside the branches.

Example (Wan 2.1's ``WanTransformerBlock``: self-attention and MLP gated from a table, cross-attention
ungated, the residual accumulated in fp32 and cast back)::

    BlockSpec(branches=(
        Branch("attn1", TableGate("scale_shift_table", 2, 6, input="temb", float32=True)),
        Branch("attn2"),                                                       # ungated
        Branch("ffn", TableGate("scale_shift_table", 5, 6, input="temb", float32=True)),
    ))
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.cache import ForecastCache
from ..core.kernels import gated_add
from .collapse import PER_BLOCK, Collapser
from .spec import (  # noqa: F401
    BlockSpec,
    Branch,
    ChunkGate,
    Gate,
    LinearGate,
    TableGate,
    _getter,
    _validate,
    assemble_returns,
)


# ------------------------------------------------------------------------------------------- building
@dataclass
class _Add:
    """A compiled Branch: where its terms are stored and how to slice them."""

    branch: Branch
    key: str
    selection: tuple | None  # (output, stream) stored under key, None: the whole output is stored
    part: tuple[str, ...] | None = None  # whole-stored split: slice terms to `into`'s part at forecast time


@dataclass
class BuiltBlock:
    """What :func:`build_block` installs on one block: forwards to set (module, new forward) and the keys."""

    forwards: list[tuple[torch.nn.Module, Callable]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # cache keys recorded on full steps


def build_block(block: torch.nn.Module, name: str, spec: BlockSpec, cache: ForecastCache,
                skip_all: bool = False, collapser: Collapser | None = None) -> BuiltBlock:
    """The forwards that make ``block`` (named ``name`` in the model) follow ``spec``.

    ``skip_all=True`` builds the bound a cache is measured against instead: on forecast steps the block
    returns its inputs and records nothing (wrong outputs, for timing only).
    """
    _validate(block, name, spec)
    read_arg = _arg_reader(block.forward, name)
    built = BuiltBlock()
    original = block.forward
    if skip_all:
        built.forwards.append((block, _skip_forward(original, read_arg, spec, cache)))
        return built
    plain = not spec.short
    lengths: dict[str, int] = {}  # token counts of the split streams at the current full step
    adds: list[_Add] = []
    selections: dict[str, list[tuple]] = {}  # module -> what its recorder stores, in order
    whole: list[str] = list(spec.record_only)
    per_call: dict[str, dict[int, str]] = {}  # module -> {call index: key} (a module called several times)
    for branch in spec.branches:
        key = f"{name}.{branch.module}"
        if branch.call is not None:
            key = per_call.setdefault(branch.module, {}).setdefault(branch.call, f"{key}#{branch.call}")
            adds.append(_Add(branch, key, None))
            continue
        elementwise = branch.output is None and branch.tokens is None and not branch.channels_first
        if plain or elementwise or (branch.tokens is not None and spec.split_storage == "whole"
                                     and branch.output is None):
            whole.append(branch.module)
            adds.append(_Add(branch, key, None, branch.tokens))
        else:
            selection = (branch.output, branch.into if branch.tokens else None)
            chosen = selections.setdefault(branch.module, [])
            if selection not in chosen:
                chosen.append(selection)
            adds.append(_Add(branch, key, selection))
    clash = (set(whole) & set(selections)) | (set(per_call) & (set(whole) | set(selections)))
    if clash:
        raise ValueError(f"{name}: module(s) {sorted(clash)} are read in more than one way (whole, in parts, per "
                         f"call); describe each module's branches one way")
    for module_name in selections:
        layouts_of = {b.channels_first for b in spec.branches if b.module == module_name}
        if len(layouts_of) > 1:
            raise ValueError(f"{name}: the branches of {module_name!r} disagree on channels_first")
    calls: dict[str, int] = {}  # per block call: how often each module of per_call ran
    layouts: dict[str, list[tuple]] = {}  # module -> the selections its last record really stored
    for module_name in dict.fromkeys(whole):
        module = block.get_submodule(module_name)
        key = f"{name}.{module_name}"
        built.forwards.append((module, _plain_forward(cache, key, module.forward)))
        built.keys.append(key)
    for module_name, chosen in selections.items():
        module = block.get_submodule(module_name)
        key = f"{name}.{module_name}"
        optional = {(b.output, b.into if b.tokens else None) for b in spec.branches
                    if b.module == module_name and b.optional}
        first = next(b for b in spec.branches if b.module == module_name)
        built.forwards.append((module, _selecting_forward(cache, key, module.forward, chosen, optional, first.tokens,
                                                          lengths, layouts.setdefault(module_name, []),
                                                          first.channels_first)))
        built.keys.append(key)
    for module_name, keys in per_call.items():
        module = block.get_submodule(module_name)
        built.forwards.append((module, _call_forward(cache, keys, module.forward, calls, module_name)))
        built.keys += list(keys.values())
    if plain:
        return built
    split_streams = sorted({s for b in spec.branches if b.tokens for s in b.tokens[:-1]})
    if collapser is not None:
        for module_name in selections:
            layouts.setdefault(module_name, [])
        collapser.register(name, block, spec, adds, layouts, read_arg)
    built.forwards.append((block, _short_forward(block, original, read_arg, spec, cache, adds, layouts, lengths,
                                                 split_streams, collapser, name, calls)))
    return built


def _plain_forward(cache: ForecastCache, key: str, forward: Callable) -> Callable:
    """The cached module itself: computed and recorded on full steps, its forecast otherwise.

    Both recorders are ``functools.partial(<cache method>, key, original, ...)``: tools that compile the
    original (taylorseer.compile) recognise them and swap ``args[1]``.
    """
    return functools.partial(cache.run, key, forward)


def _call_forward(cache: ForecastCache, keys: dict[int, str], forward: Callable, calls: dict, module: str) -> Callable:
    """A module the block calls more than once: call ``i`` of a block call is recorded under ``keys[i]`` on full
    steps, the calls not described run as they are (a forecast step calls none of them)."""

    def run(*args, **kwargs):
        i = calls.get(module, 0)
        calls[module] = i + 1
        key = keys.get(i)
        if key is None:
            return forward(*args, **kwargs)
        return cache.run_recording(key, forward, _whole, *args, **kwargs)

    return run


def _whole(out):
    return out


def _selecting_forward(cache, key, forward, chosen, optional, tokens, lengths, layout,
                       channels_first: bool = False) -> Callable:
    """Records, on full steps, only the elements / token parts of the output that forecast steps read
    (``channels_first``: a ``(B, C, *spatial)`` output as the tokens ``(B, T, C)`` the block adds)."""

    def select(out) -> tuple:
        stored, present = [], []
        for output, stream in chosen:
            if output is not None and not isinstance(out, (tuple, list)):
                raise RuntimeError(f"{key} returned one tensor; the description reads its output {output}")
            tensor = out if output is None else (out[output] if output < len(out) else None)
            if tensor is None:
                if (output, stream) in optional:
                    continue
                raise RuntimeError(f"{key} returned {len(out)} outputs; the description reads output {output}")
            if channels_first:
                tensor = tensor.flatten(2).transpose(1, 2)
            if stream is not None:
                tensor = _token_part(tensor, tokens, stream, lengths)
            stored.append(tensor)
            present.append((output, stream))
        layout[:] = present
        return tuple(stored)

    return functools.partial(cache.run_recording, key, forward, select)


def _short_forward(block, original, read_arg, spec: BlockSpec, cache, adds, layouts, lengths, split_streams,
                   collapser=None, name_of: str = "", calls: dict | None = None):
    returns = spec.returns
    calls = {} if calls is None else calls

    def forward(*args, **kwargs):
        if cache.is_full:
            calls.clear()  # the per-call recorders count this block call's calls from 0
            for stream in split_streams:
                lengths[stream] = read_arg(args, kwargs, stream).shape[1]
            if collapser is not None:
                collapser.before_full(name_of, args, kwargs)
            out = original(*args, **kwargs)
            if collapser is not None:
                collapser.observe(name_of, args, kwargs, out)
            return out
        if collapser is not None:
            result = collapser.forecast(name_of, args, kwargs)
            if result is not PER_BLOCK:
                return result

        def read(arg):
            return read_arg(args, kwargs, arg)

        memo: dict = {}  # activations and gates, computed once per block call
        terms: dict[str, list] = {}
        outs: dict[str, torch.Tensor] = {}
        for add in adds:
            branch = add.branch
            stored = terms.get(add.key)
            if stored is None:
                stored = terms[add.key] = cache.terms(add.key)
            if add.selection is None:
                position = 0 if branch.output is None else branch.output
            else:
                layout = layouts[branch.module]
                if add.selection not in layout:
                    continue  # an optional output the module did not return
                position = layout.index(add.selection)
            if position >= len(stored):
                if branch.optional:
                    continue
                raise RuntimeError(f"{add.key} holds {len(stored)} outputs; the description reads output {position}")
            factor_terms = stored[position]
            residual = read(branch.into)
            if add.part is not None:
                factor_terms = _slice_terms(factor_terms, add.part, branch.into, read)
            out = outs.get(branch.into)
            if branch.gate is None:
                outs[branch.into] = residual_add(residual, factor_terms, out)
            else:
                gate = memo.get(branch.gate)
                if gate is None:
                    gate = memo[branch.gate] = branch.gate.compute(block, read, memo)
                outs[branch.into] = gated_add(residual, gate, factor_terms, out=out)
        for stream, out in outs.items():
            residual = read(stream)
            if out.dtype != residual.dtype:  # Wan accumulates in fp32 and casts back
                out = outs[stream] = out.to(residual.dtype)
            if stream in spec.clip_fp16 and out.dtype == torch.float16:
                outs[stream] = out.clip(-65504, 65504)
        return assemble_returns(returns, outs, read)

    return forward


def _skip_forward(original, read_arg, spec: BlockSpec, cache):
    def forward(*args, **kwargs):
        if cache.is_full:
            return original(*args, **kwargs)
        return assemble_returns(spec.returns, {}, lambda arg: read_arg(args, kwargs, arg))

    return forward


def residual_add(residual: torch.Tensor, terms, out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + sum_i c_i F_i`` (into ``out`` when given): an ungated branch folded into the residual add."""
    for c, factor in terms:
        if out is None:
            out = torch.add(residual, factor, alpha=c)
        else:
            out.add_(factor, alpha=c)
    return out


def _slice_terms(terms, tokens: tuple[str, ...], stream: str, read: Callable):
    """``stream``'s tokens of factors stored over ``cat(tokens)``: slice every factor, no copy."""
    start, stop = _part_bounds(tokens, stream, lambda s: read(s).shape[1])
    return [(c, f[:, start:stop]) for c, f in terms]


def _token_part(tensor: torch.Tensor, tokens: tuple[str, ...], stream: str, lengths: dict) -> torch.Tensor:
    start, stop = _part_bounds(tokens, stream, lengths.__getitem__)
    return tensor[:, start:stop]


def _part_bounds(tokens: tuple[str, ...], stream: str, length: Callable[[str], int]) -> tuple[int | None, int | None]:
    """Token range of ``stream`` in ``cat(tokens)``; None bounds for the first/last part (no length needed)."""
    i = tokens.index(stream)
    start = sum(length(s) for s in tokens[:i]) if i else None
    stop = None if i == len(tokens) - 1 else (start or 0) + length(stream)
    return start, stop


def _arg_reader(forward: Callable, name: str) -> Callable[[tuple, dict, str], object]:
    """``read(args, kwargs, param)``: a ``forward`` argument by name, however it was passed (built once)."""
    params = list(inspect.signature(forward).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    index = {p.name: i for i, p in enumerate(params) if p.kind in positional}
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    known = [p.name for p in params]

    def read(args: tuple, kwargs: dict, param: str):
        i = index.get(param)
        if i is not None and i < len(args):
            return args[i]
        if param in kwargs:
            return kwargs[param]
        if param in defaults:
            return defaults[param]
        raise TypeError(f"{name}.forward was called without {param!r} (its parameters: {known})")

    read.params = known  # type: ignore[attr-defined]
    return read


def check_inputs(block: torch.nn.Module, name: str, spec: BlockSpec) -> None:
    """The stream and gate inputs a description names must be parameters of the block's ``forward``."""
    params = list(inspect.signature(block.forward).parameters.values())
    names = {p.name for p in params}
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    wanted = set(spec.streams) | {b.gate.input for b in spec.branches if b.gate is not None}
    wanted |= {s for b in spec.branches if b.tokens for s in b.tokens}
    wanted |= {s for s in ([spec.returns] if isinstance(spec.returns, str) else spec.returns) if s}
    missing = sorted(wanted - names) if not has_kwargs else []
    if missing:
        raise ValueError(f"{name}: the description reads {missing}, which {type(block).__name__}.forward does not "
                         f"take (its parameters: {[p.name for p in params]})")
