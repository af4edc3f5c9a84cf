"""The description language of a block: its residual branches, their gates, and the checks of a description.

What each class means is in :mod:`taylorseer.attach.blocks` (which builds the forwards from it); this module
holds the vocabulary alone, so a description can be written and validated without the builder.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


@dataclass(frozen=True)
class LinearGate:
    """``g = linear(act(input)).chunk(chunks, dim=1)[index]`` (adaLN-Zero), read through only its rows.

    ``linear`` is the path of the ``nn.Linear`` inside the block (``"norm1.linear"``,
    ``"adaLN_modulation.1"``), ``input`` the block ``forward`` argument it reads (``"temb"``, ``"c"``),
    ``activation`` what the block applies to it first (computed once per block and input), ``gate_activation``
    what it applies to the chunk (Lumina2: ``tanh``).
    """

    linear: str
    index: int
    chunks: int
    input: str = "temb"
    activation: str | None = "silu"
    unsqueeze: bool = True  # (B, C) -> (B, 1, C), broadcast over the tokens
    gate_activation: str | None = None

    def compute(self, block: torch.nn.Module, read: Callable[[str], object], memo: dict) -> torch.Tensor:
        key = (self.input, self.activation)
        emb = memo.get(key)
        if emb is None:
            emb = read(self.input)
            if self.activation is not None:
                emb = ACTIVATIONS[self.activation](emb)
            memo[key] = emb
        gate = modulation_chunk(_getter(self.linear)(block), emb, self.chunks, self.index)
        gate = gate.unsqueeze(1) if self.unsqueeze else gate
        return gate if self.gate_activation is None else ACTIVATIONS[self.gate_activation](gate)

    def validate(self, block: torch.nn.Module) -> None:
        _check_attr(block, self.linear, "LinearGate.linear")
        _check_activation(self, "activation")
        _check_activation(self, "gate_activation")
        _check_chunk(self)


@dataclass(frozen=True)
class TableGate:
    """``g = (table + input).chunk(chunks, dim=-2)[index]`` with a learned ``(chunks, C)`` table.

    PixArt: ``scale_shift_table[None] + timestep.reshape(B, 6, -1)`` (``input`` is ``(B, 6C)``); Wan:
    ``scale_shift_table + temb.float()`` (``(B, 6, C)``, or ``(B, S, 6, C)`` per token in Wan 2.2 TI2V); LTX-Video:
    ``temb`` is ``(B, S, 6C)`` (``S = 1``, or one row per token): an input whose last dimension holds all the
    chunks is split there. Only row ``index`` of the table and of the input is read.
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
        if t.shape[-1] != row.shape[-1]:  # (B, chunks * C): PixArt; (B, S, chunks * C): LTX-Video
            t = t.reshape(*t.shape[:-1], self.chunks, -1)
        if t.dim() == 3:  # (B, chunks, C) -> (B, 1, C)
            return row + t[:, self.index : self.index + 1]
        return row + t[:, :, self.index]  # (B, S, chunks, C) -> (B, S, C): one gate per token

    def validate(self, block: torch.nn.Module) -> None:
        table = _check_attr(block, self.table, "TableGate.table")
        if not isinstance(table, torch.Tensor) or table.numel() % self.chunks:
            raise ValueError(f"TableGate.table={self.table!r} must be a tensor of {self.chunks} rows")
        _check_chunk(self)


@dataclass(frozen=True)
class ChunkGate:
    """``g = input.chunk(chunks, dim=-1)[index]``: the modulation computed outside the block and passed in.

    Flux2 computes every block's modulation once per step (``temb_mod_img``, ``(B, 6C)`` or ``(B, 1, 6C)``) and
    passes it to the blocks as an argument. ``gate_activation`` is applied to the chunk (e.g. ``"tanh"``).
    """

    input: str
    index: int
    chunks: int
    gate_activation: str | None = None

    def compute(self, block: torch.nn.Module, read: Callable[[str], object], memo: dict) -> torch.Tensor:
        t = read(self.input)
        if t.dim() == 2:  # (B, chunks * C) -> (B, 1, chunks * C), broadcast over the tokens
            t = t.unsqueeze(1)
        gate = t.chunk(self.chunks, dim=-1)[self.index]
        return gate if self.gate_activation is None else ACTIVATIONS[self.gate_activation](gate)

    def validate(self, block: torch.nn.Module) -> None:
        _check_activation(self, "gate_activation")
        _check_chunk(self)


Gate = LinearGate | TableGate | ChunkGate


@dataclass(frozen=True)
class Branch:
    """One residual add of a cached branch: ``into <- into + gate * feature`` (``gate=None``: ungated).

    ``module`` is the submodule (relative to the block) whose output is the cached feature; ``output``
    picks an element of a tuple output (FLUX's joint attention returns ``(image, text)``), ``optional``
    skips the add when that element is absent (FLUX's IP-adapter output). ``tokens`` says the output
    concatenates the tokens of these streams in this order (FLUX's single block: ``proj_out`` over
    ``cat(text, image)``): ``into``'s part of it is added. ``call`` says which call's output is the feature
    when the block calls the module more than once (CogView4's ``ff``: call 0 on the image tokens, call 1 on
    the text); the other calls run uncached. ``channels_first``: the module returns ``(B, C, *spatial)`` and the
    block adds it as tokens ``(B, T, C)`` (Sana's convolutional feed-forward); the tokens are recorded.
    The cached module may be a post-processing one: Lumina2 adds ``norm2(attn(...))``, so ``norm2`` is the
    branch (its output is what the add reads).
    """

    module: str
    gate: Gate | None = None
    into: str = "hidden_states"
    output: int | None = None
    optional: bool = False
    tokens: tuple[str, ...] | None = None
    call: int | None = None
    channels_first: bool = False

    def __post_init__(self):
        if self.tokens is not None and self.into not in self.tokens:
            raise ValueError(f"Branch({self.module!r}): into={self.into!r} is not one of tokens={self.tokens}")
        if self.call is not None and (self.output is not None or self.tokens is not None or self.channels_first
                                      or self.call < 0):
            raise ValueError(f"Branch({self.module!r}, call={self.call}): a module's call is cached whole (no output, "
                             f"tokens or channels_first), call >= 0")


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
        collapse: False runs the block per block under the collapsed forecast step
            (:mod:`taylorseer.attach.collapse`), which keeps one set of factors per residual stream name: where
            two block lists update a stream of one name with different token counts (Flux2: the double blocks'
            image tokens, the single blocks' text and image tokens), the shorter list runs per block.
    """

    branches: tuple[Branch, ...]
    returns: str | tuple[str | None, ...] = "hidden_states"
    clip_fp16: tuple[str, ...] = ()
    split_storage: str = "parts"
    record_only: tuple[str, ...] = ()
    short: bool = True
    collapse: bool = True

    def __post_init__(self):
        if self.split_storage not in ("parts", "whole"):
            raise ValueError(f"BlockSpec.split_storage={self.split_storage!r}: expected 'parts' or 'whole'")
        if not self.branches and not self.record_only:
            raise ValueError("a BlockSpec needs at least one branch")
        if not self.short and any(b.call is not None or b.channels_first for b in self.branches):
            raise ValueError("BlockSpec(short=False) caches its modules whole: no Branch(call=...) or "
                             "Branch(channels_first=True)")

    @property
    def modules(self) -> tuple[str, ...]:
        """The cached submodules, each once, in order."""
        return tuple(dict.fromkeys([b.module for b in self.branches] + list(self.record_only)))

    @property
    def streams(self) -> tuple[str, ...]:
        """The block inputs a forecast step reads as residuals, each once."""
        return tuple(dict.fromkeys(b.into for b in self.branches))


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


def _check_activation(gate, attribute: str) -> None:
    value = getattr(gate, attribute)
    if value is not None and value not in ACTIVATIONS:
        raise ValueError(f"{type(gate).__name__}.{attribute}={value!r}: expected one of {sorted(ACTIVATIONS)} or None")


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


def modulation_chunk(linear: torch.nn.Module, x: torch.Tensor, chunks: int, index: int) -> torch.Tensor:
    """``linear(x).chunk(chunks, dim=1)[index]``, reading only that chunk's rows of a plain ``nn.Linear``.

    A forecast step needs the gates alone, a third of each modulation matrix: on FLUX.1-dev that is
    1.4 GB of bf16 weights read per forecast step instead of 6.4 GB. A Linear that is
    wrapped (LoRA, quantised, offloaded, cast by hooks) runs whole, as it would in the block.
    """
    plain = (type(linear) is torch.nn.Linear and "forward" not in linear.__dict__ and not linear._forward_hooks
             and not linear._forward_pre_hooks)
    if not plain:
        return linear(x).chunk(chunks, dim=1)[index]
    n = linear.out_features // chunks
    bias = None if linear.bias is None else linear.bias[index * n:(index + 1) * n]
    return F.linear(x, linear.weight[index * n:(index + 1) * n], bias)


def assemble_returns(returns, outs: dict, read: Callable):
    """What a block returns (``BlockSpec.returns``): the streams it updated from ``outs``, the others as read."""
    def value(stream):
        if stream is None:
            return None
        out = outs.get(stream)
        return read(stream) if out is None else out

    if isinstance(returns, str):
        return value(returns)
    return tuple(value(s) for s in returns)
