"""Describe a transformer block as residual branches; the core derives the rest.

An adaLN-Zero block (DiT, FLUX, SD3, Wan, PixArt, HunyuanVideo, CogVideoX) updates each of its residual
streams as ``x <- x + g_b * B_b(...)`` for its branches ``b`` (attention, cross-attention, MLP), with gates
``g_b`` from a modulation of the conditioning (or ``g_b = 1``: Wan's and PixArt's cross-attention). TaylorSeer
caches the pre-gate branch outputs ``B_b`` (paper section 3; REFERENCE.md section 1), so on a forecast step the
block reduces to

    x_out = x + sum_b g_b * F_b,      F_b = sum_i c_i D_{b,i}   (the Taylor forecast, paper eq. 7-8)

From a :class:`BlockSpec` the core builds both halves of that:

* what to record on a full step: each branch module's output (or the elements / token parts of it that
  a forecast step reads), through a wrapper on the module's ``forward``;
* the short forward of a forecast step: only the gate rows of the modulation are read
  (:func:`taylorseer.blockops.modulation_chunk`), the forecast is folded into the residual add
  (:func:`taylorseer.blockops.gated_add`, one pass per factor), and nothing else of the block runs.

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
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .blockops import gated_add, modulation_chunk
from .cache import ForecastCache

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu}


@dataclass(frozen=True)
class LinearGate:
    """``g = linear(act(input)).chunk(chunks, dim=1)[index]`` (adaLN-Zero), read through only its rows.

    ``linear`` is the path of the ``nn.Linear`` inside the block (``"norm1.linear"``,
    ``"adaLN_modulation.1"``), ``input`` the block ``forward`` argument it reads (``"temb"``, ``"c"``),
    ``activation`` what the block applies to it first (computed once per block and input).
    """

    linear: str
    index: int
    chunks: int
    input: str = "temb"
    activation: str | None = "silu"
    unsqueeze: bool = True  # (B, C) -> (B, 1, C), broadcast over the tokens

    def compute(self, block: torch.nn.Module, read: Callable[[str], object], memo: dict) -> torch.Tensor:
        key = (self.input, self.activation)
        emb = memo.get(key)
        if emb is None:
            emb = read(self.input)
            if self.activation is not None:
                emb = ACTIVATIONS[self.activation](emb)
            memo[key] = emb
        gate = modulation_chunk(_getter(self.linear)(block), emb, self.chunks, self.index)
        return gate.unsqueeze(1) if self.unsqueeze else gate

    def validate(self, block: torch.nn.Module) -> None:
        _check_attr(block, self.linear, "LinearGate.linear")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"LinearGate.activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)} "
                             f"or None")
        _check_chunk(self)


@dataclass(frozen=True)
class TableGate:
    """``g = (table + input).chunk(chunks, dim=-2)[index]`` with a learned ``(chunks, C)`` table.

    PixArt: ``scale_shift_table[None] + timestep.reshape(B, 6, -1)`` (``input`` is ``(B, 6C)``); Wan:
    ``scale_shift_table + temb.float()`` (``(B, 6, C)``, or ``(B, S, 6, C)`` per token in Wan 2.2 TI2V).
    Only row ``index`` of the table and of the input is read.
    """

    table: str
    index: int
    chunks: int
    input: str = "temb"
    float32: bool = False  # Wan adds the table to temb.float()

    def compute(self, block: torch.nn.Module, read: Callable[[str], object], memo: dict) -> torch.Tensor:
        t = read(self.input)
        if self.float32:
            t = t.float()
        row = _getter(self.table)(block).reshape(self.chunks, -1)[self.index]  # (C,)
        if t.dim() == 2:  # (B, chunks * C): PixArt
            t = t.reshape(t.shape[0], self.chunks, -1)
        if t.dim() == 3:  # (B, chunks, C) -> (B, 1, C)
            return row + t[:, self.index : self.index + 1]
        return row + t[:, :, self.index]  # (B, S, chunks, C) -> (B, S, C): one gate per token

    def validate(self, block: torch.nn.Module) -> None:
        table = _check_attr(block, self.table, "TableGate.table")
        if not isinstance(table, torch.Tensor) or table.numel() % self.chunks:
            raise ValueError(f"TableGate.table={self.table!r} must be a tensor of {self.chunks} rows")
        _check_chunk(self)


Gate = LinearGate | TableGate


@dataclass(frozen=True)
class Branch:
    """One residual add of a cached branch: ``into <- into + gate * feature`` (``gate=None``: ungated).

    ``module`` is the submodule (relative to the block) whose output is the cached feature; ``output``
    picks an element of a tuple output (FLUX's joint attention returns ``(image, text)``), ``optional``
    skips the add when that element is absent (FLUX's IP-adapter output). ``tokens`` says the output
    concatenates the tokens of these streams in this order (FLUX's single block: ``proj_out`` over
    ``cat(text, image)``): ``into``'s part of it is added.
    """

    module: str
    gate: Gate | None = None
    into: str = "hidden_states"
    output: int | None = None
    optional: bool = False
    tokens: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.tokens is not None and self.into not in self.tokens:
            raise ValueError(f"Branch({self.module!r}): into={self.into!r} is not one of tokens={self.tokens}")


@dataclass(frozen=True)
class BlockSpec:
    """A block as its residual branches (see the module docstring).

    Attributes:
        branches: the residual adds a forecast step performs, in the block's order.
        returns: what the block's ``forward`` returns: a stream name, or a tuple of stream names
            (``None`` for a literal ``None``, as SD3's last block returns for the text).
        clip_fp16: streams diffusers clips to the fp16 range after the block (FLUX).
        split_storage: for branches with ``tokens``: ``"parts"`` records each stream's part under its own
            key (only the streams a forecast step reads), ``"whole"`` records the module's whole output and
            slices it on forecast steps.
        record_only: modules recorded on full steps that no forecast step reads (upstream HunyuanVideo
            records the single blocks' attention; it costs memory only).
        short: False keeps the block's own forward on forecast steps (its branch modules then return their
            forecasts): the plain-module way, for blocks with work the description does not cover.
    """

    branches: tuple[Branch, ...]
    returns: str | tuple[str | None, ...] = "hidden_states"
    clip_fp16: tuple[str, ...] = ()
    split_storage: str = "parts"
    record_only: tuple[str, ...] = ()
    short: bool = True

    def __post_init__(self):
        if self.split_storage not in ("parts", "whole"):
            raise ValueError(f"BlockSpec.split_storage={self.split_storage!r}: expected 'parts' or 'whole'")
        if not self.branches and not self.record_only:
            raise ValueError("a BlockSpec needs at least one branch")

    @property
    def modules(self) -> tuple[str, ...]:
        """The cached submodules, each once, in order."""
        return tuple(dict.fromkeys([b.module for b in self.branches] + list(self.record_only)))

    @property
    def streams(self) -> tuple[str, ...]:
        """The block inputs a forecast step reads as residuals, each once."""
        return tuple(dict.fromkeys(b.into for b in self.branches))


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
                skip_all: bool = False) -> BuiltBlock:
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
    for branch in spec.branches:
        key = f"{name}.{branch.module}"
        elementwise = branch.output is None and branch.tokens is None
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
    clash = set(whole) & set(selections)
    if clash:
        raise ValueError(f"{name}: module(s) {sorted(clash)} are read both whole and in parts; describe each "
                         f"module's branches one way")
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
        tokens = next(b.tokens for b in spec.branches if b.module == module_name)
        built.forwards.append((module, _selecting_forward(cache, key, module.forward, chosen, optional, tokens,
                                                          lengths, layouts.setdefault(module_name, []))))
        built.keys.append(key)
    if plain:
        return built
    split_streams = sorted({s for b in spec.branches if b.tokens for s in b.tokens[:-1]})
    built.forwards.append((block, _short_forward(block, original, read_arg, spec, cache, adds, layouts, lengths,
                                                 split_streams)))
    return built


def _plain_forward(cache: ForecastCache, key: str, forward: Callable) -> Callable:
    """The cached module itself: computed and recorded on full steps, its forecast otherwise.

    Both recorders are ``functools.partial(<cache method>, key, original, ...)``: tools that compile the
    original (taylorseer.compile) recognise them and swap ``args[1]``.
    """
    return functools.partial(cache.run, key, forward)


def _selecting_forward(cache, key, forward, chosen, optional, tokens, lengths, layout) -> Callable:
    """Records, on full steps, only the elements / token parts of the output that forecast steps read."""

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
            if stream is not None:
                tensor = _token_part(tensor, tokens, stream, lengths)
            stored.append(tensor)
            present.append((output, stream))
        layout[:] = present
        return tuple(stored)

    return functools.partial(cache.run_recording, key, forward, select)


def _short_forward(block, original, read_arg, spec: BlockSpec, cache, adds, layouts, lengths, split_streams):
    returns = spec.returns

    def forward(*args, **kwargs):
        if cache.is_full:
            for stream in split_streams:
                lengths[stream] = read_arg(args, kwargs, stream).shape[1]
            return original(*args, **kwargs)

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
        return _assemble(returns, outs, read)

    return forward


def _skip_forward(original, read_arg, spec: BlockSpec, cache):
    def forward(*args, **kwargs):
        if cache.is_full:
            return original(*args, **kwargs)
        return _assemble(spec.returns, {}, lambda arg: read_arg(args, kwargs, arg))

    return forward


def _assemble(returns, outs: dict, read: Callable):
    def value(stream):
        if stream is None:
            return None
        out = outs.get(stream)
        return read(stream) if out is None else out

    if isinstance(returns, str):
        return value(returns)
    return tuple(value(s) for s in returns)


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


# ----------------------------------------------------------------------------------------- checking
_GETTERS: dict[str, Callable] = {}


def _getter(path: str) -> Callable:
    """``block -> block.<path>`` for dotted paths (``"adaLN_modulation.1"`` works: modules index by name)."""
    getter = _GETTERS.get(path)
    if getter is None:
        getter = _GETTERS[path] = operator.attrgetter(path)
    return getter


def _check_attr(block: torch.nn.Module, path: str, what: str):
    try:
        return _getter(path)(block)
    except AttributeError:
        children = [n for n, _ in block.named_children()]
        raise ValueError(f"{what}={path!r} does not exist in {type(block).__name__}; its children are {children}") \
            from None


def _check_chunk(gate) -> None:
    if not 0 <= gate.index < gate.chunks:
        raise ValueError(f"{type(gate).__name__}.index={gate.index} is outside 0..{gate.chunks - 1}")


def _validate(block: torch.nn.Module, name: str, spec: BlockSpec) -> None:
    children = dict(block.named_modules())
    for module_name in spec.modules:
        if module_name not in children or not module_name:
            listed = [n for n, _ in block.named_children()]
            raise ValueError(f"{name}: the description caches {module_name!r}, which {type(block).__name__} does not "
                             f"have; its children are {listed}")
    for branch in spec.branches:
        if branch.gate is not None:
            branch.gate.validate(block)


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
