"""Folded records of the collapsed forecast step: a run's branches recorded as a few summed features.

On a forecast step a run of blocks adds ``sum_b g_b(t) F_b(t)`` to each residual stream (:mod:`.collapse`). Where
the gates of several adds differ only by a constant, that sum needs fewer features than one per branch:

    ungated (g = 1; Wan's, PixArt's, Sana's, LTX-Video's cross-attention)     sum_b F_b          = U
    ChunkGate (g = a chunk of one input every block reads; Flux2)             sum_b g F_b = g C,   C = sum_b F_b
    TableGate (g = T_b + e(t), e a row of one input; Wan, PixArt, Sana, LTX)  sum_b (T_b + e) F_b = P + e Q,
                                                                              P = sum_b T_b F_b,  Q = sum_b F_b

Every forecaster's factors are linear in the feature, so the forecasts of ``U, C, P, Q`` are the sums of the
per-branch forecasts: the same forecast step up to float rounding, from 1 or 2 features per group and run instead
of one per block. Sana at mid size keeps 10 factor slots instead of 24; at full size 10 instead of 120 (20 blocks).

The records are made on full steps, while the blocks run: a block *folds* when its adds are all of these kinds
(:func:`foldable`) and, checked before it runs, its gate inputs hold one gate row per sample (not per token: Wan 2.2
TI2V) and, for tables, the factors are fp32: ``P + e Q`` cancels where a gate is near zero (``T_b ~ -e``), which
bf16 factors would not survive. A run of folding blocks is each linked to the one before it (the same test as the
collapsed step's runs: its stream inputs are the previous block's outputs, its gate inputs the same tensors); its
branch outputs go to the run's sums instead of per-branch records (:meth:`ForecastCache.update`'s ``diverted``),
and where the run ends its sums are recorded as one key per stream, ``fold:<head>..<tail>:<stream>``. A block
that does not fold on a step records per branch as before. A forecast step computes a folded run at its head,
``x_L = x_0 + sum_j m_j sum_i w_i D_ji`` in one pass (``m_j`` = 1, or the gate input's row ``e``, or the chunk
``g``), and the run's other blocks pass their inputs through. ``TAYLORSEER_FOLD=0`` (read when a model is
attached) records every branch on its own, as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.arena import Arena, stream_update, weights_on
from .spec import ChunkGate, TableGate, _getter

PREFIX = "fold:"


def fold_enabled() -> bool:
    """``TAYLORSEER_FOLD``: 1 (the default) folds where it can, 0 records every branch on its own."""
    value = os.environ.get("TAYLORSEER_FOLD", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"TAYLORSEER_FOLD={value!r} is not a setting: expected 1 (fold a run's branches into sums "
                         f"where they can, the default) or 0 (record every branch on its own)")
    return value == "1"


def fold_key(head: str, tail: str, stream: str) -> str:
    return f"{PREFIX}{head}..{tail}:{stream}"


def foldable(gates) -> bool:
    """Whether a block's adds (collapse._Gate records) can all be folded: ungated, ChunkGate or TableGate."""
    return bool(gates) and all(g.gate is None or isinstance(g.gate, (ChunkGate, TableGate)) for g in gates)


def _group(gate) -> tuple:
    """The group an add folds into, within its stream: adds of one group share the time-varying part of their
    gates (none, the same chunk of the same input, the same row of the same input)."""
    if gate is None:
        return ("one",)
    if isinstance(gate, ChunkGate):
        return ("chunk", gate)
    return ("table", gate.input, gate.index, gate.chunks, gate.float32)


def _table_input_row(gate: TableGate, t) -> torch.Tensor | None:
    """``e``: the time-varying part of a TableGate, ``(B, C)``; None where the gate is per token. Its dtype does not
    matter: it is copied into the fp32 multipliers, as Wan's ``float32`` table add has it."""
    if not isinstance(t, torch.Tensor):
        return None
    if t.dim() == 2:  # (B, chunks * C): PixArt, Sana
        t = t.reshape(t.shape[0], gate.chunks, -1)
    elif t.dim() == 3 and t.shape[1] != gate.chunks:  # (B, S, chunks * C): LTX-Video
        t = t.reshape(*t.shape[:2], gate.chunks, -1)
    if t.dim() == 4:  # (B, S, chunks, C): one row per token unless S == 1
        if t.shape[1] != 1:
            return None
        t = t[:, 0]
    return t[:, gate.index] if t.dim() == 3 else None


def _chunk_row(gate: ChunkGate, block, read) -> torch.Tensor | None:
    g = gate.compute(block, read, {})
    if g.dim() == 3 and g.shape[1] == 1:
        return g[:, 0]
    return g if g.dim() == 2 else None


@dataclass
class _Sums:
    """One stream's sums in a run being recorded: feature order and, per feature, its multiplier's kind."""

    features: list[torch.Tensor] = field(default_factory=list)
    kinds: list[tuple] = field(default_factory=list)  # ("one",) | ("gate", the head's TableGate or ChunkGate)
    index: dict[tuple, int] = field(default_factory=dict)  # (group, "sum" | "table") -> feature position


@dataclass
class _Run:
    token: tuple
    head: str
    tail: str
    blocks: list[str]
    sums: dict[str, _Sums] = field(default_factory=dict)
    buffers: list[torch.Tensor] = field(default_factory=list)  # record slots the sums are computed in


@dataclass
class Segment:
    """A folded run as its last full step recorded it: forecast at its head, passed through by the others."""

    head: str
    tail: str
    blocks: list[str]
    streams: dict[str, list[tuple]]  # stream -> the multiplier kind of each recorded feature
    keys: dict[str, str]  # stream -> cache key of its features


class Folder:
    """The folded records of one :class:`.collapse.Collapser` (its entries, cache and arenas)."""

    def __init__(self, collapser):
        self.collapser = collapser
        self.cache = collapser.cache
        self.eligible: set[str] = set()
        self.owners: dict[str, str] = {}  # branch key -> its block
        self._open: _Run | None = None
        self._folding: str | None = None  # the block running now, if it folds on this full step
        self.segments: dict[str, dict[str, Segment]] = {}  # context -> head -> segment
        self.members: dict[str, dict[str, str]] = {}  # context -> block -> the head of its folded run
        self._recorded: dict[str, set[str]] = {}  # context -> heads recorded on its current full step
        self.folded_runs = 0  # runs recorded folded (for tests and summaries)

    # ---------------------------------------------------------------------------------------- building
    def register(self, entry) -> None:
        if not fold_enabled() or entry.optional or not foldable(entry.gates):
            return
        self.eligible.add(entry.name)
        for gate in entry.gates:
            self.owners[gate.key] = entry.name
            self.cache.diverted[gate.key] = self._divert

    def active(self) -> bool:
        config = self.cache.config
        return (self.collapser.active() and not self.collapser.per_stream and config.schedule != "adaptive"
                and not (config.schedule == "interval" and config.interval == 1))

    # -------------------------------------------------------------------------------------- full steps
    def before_full(self, entry, read, linked_to: str | None, token: tuple) -> None:
        """Block ``entry`` is about to run on a full step: it folds into the open run, starts one, or records per
        branch (``linked_to``: the block called just before it, when its inputs are that block's outputs and gate
        inputs; else None)."""
        self._folding = None
        if entry.name not in self.eligible or not self.active() or not self._folds_now(entry, read):
            self._close()
            return
        run = self._open
        if run is not None and (run.token != token or run.tail != linked_to or not self._same_streams(run, entry)):
            self._close()
            run = None
        if run is None:
            run = self._open = _Run(token, entry.name, entry.name, [])
        run.tail = entry.name
        run.blocks.append(entry.name)
        for gate in entry.gates:  # the run's groups in a fixed order: the first block's adds
            sums = run.sums.setdefault(gate.stream, _Sums())
            group = _group(gate.gate)
            parts = ("sum",) if group[0] != "table" else ("table", "sum")
            for part in parts:
                if (group, part) not in sums.index:
                    sums.index[(group, part)] = len(sums.features)
                    sums.features.append(None)
                    sums.kinds.append(("one",) if group[0] == "one" or part == "table" else ("gate", gate.gate))
        self._folding = entry.name
        for key in {g.key for g in entry.gates}:
            self.cache.forget(key)  # its per-branch factors would go stale: the run's sums replace them

    def _same_streams(self, run: _Run, entry) -> bool:
        """A run's groups are its first block's: a block adding other groups starts a run of its own."""
        head = self.collapser.entries[run.head]
        return {(g.stream, _group(g.gate)) for g in entry.gates} == {(g.stream, _group(g.gate)) for g in head.gates}

    def _folds_now(self, entry, read) -> bool:
        for stream in entry.spec.clip_fp16:  # diffusers clips these fp16 streams after each block: not one sum
            try:
                if read(stream).dtype == torch.float16:
                    return False
            except (TypeError, AttributeError):
                return False
        for gate in entry.gates:
            if isinstance(gate.gate, TableGate):
                try:
                    x, t = read(gate.stream), read(gate.gate.input)
                except TypeError:
                    return False
                if self.cache._factor_dtype(x) != torch.float32 or _table_input_row(gate.gate, t) is None:
                    return False  # bf16 factors (P + e Q would cancel), or one gate row per token
            elif isinstance(gate.gate, ChunkGate):
                try:
                    if _chunk_row(gate.gate, entry.block, read) is None:
                        return False
                except Exception:  # an input of another shape than the description expects: per branch
                    return False
        return True

    def _divert(self, key: str, output) -> bool:
        """A branch output of a full step (``ForecastCache.update``): added to the open run's sums when its block
        folds now (True), else recorded per branch by the cache (False)."""
        name = self.owners.get(key)
        if name is None or name != self._folding or self._open is None:
            return False
        entry = self.collapser.entries[name]
        tensors = output if isinstance(output, tuple) else (output,)
        for gate in entry.gates:
            if gate.key != key:
                continue
            position = self.collapser.position(gate)
            if position is None or position >= len(tensors):
                raise RuntimeError(f"{key}: the output the description reads is missing on this full step; use "
                                   f"cache.forecast_step=per_block for this model")
            self._add(gate, entry.block, tensors[position])
        return True

    def _add(self, gate, block, feature: torch.Tensor) -> None:
        sums = self._open.sums[gate.stream]
        group = _group(gate.gate)
        dtype = self.cache._factor_dtype(feature)
        parts = [("sum", None)]
        if group[0] == "table":
            row = _getter(gate.gate.table)(block).reshape(gate.gate.chunks, -1)[gate.gate.index]
            parts.insert(0, ("table", row.to(dtype)))
        for part, row in parts:
            i = sums.index[(group, part)]
            acc = sums.features[i]
            if acc is None:
                acc = self._buffer(gate.stream, i, feature, dtype)
                if row is None:
                    acc.copy_(feature)
                else:
                    torch.mul(feature, row, out=acc)
                sums.features[i] = acc
            elif row is None:
                acc.add_(feature)
            else:
                acc.addcmul_(feature, row)

    def _buffer(self, stream: str, index: int, feature: torch.Tensor, dtype) -> torch.Tensor:
        """Where a sum starts: the slot the record of the same run (its last full step) will store it in, so the
        sum is the new factor in place (no copy, no allocation); a new tensor for a new run."""
        old = self.segments.get(self.cache.context_name, {}).get(self._open.head)
        used = self._open.buffers
        if old is not None and stream in old.keys:
            spare = self.cache.spare(old.keys[stream], index, feature)
            if spare is not None and not any(spare is b for b in used):
                used.append(spare)
                return spare
        return torch.empty(feature.shape, dtype=dtype, device=feature.device)  # contiguous, as slots are

    def end_step(self, full: bool) -> None:
        """The model call ended: record the run still open; on a full step forget the folded runs of this context
        that were not recorded again (the model's blocks ran otherwise)."""
        self._close()
        self._folding = None
        if not full:
            return
        context = self.cache.context_name
        recorded = self._recorded.pop(context, set())
        segments = self.segments.get(context, {})
        for head in [h for h in segments if h not in recorded]:
            self._drop(context, segments.pop(head))

    def _drop(self, context: str, segment: Segment) -> None:
        for key in segment.keys.values():
            self.cache.forget(key)
        members = self.members.get(context, {})
        for block in segment.blocks:
            if members.get(block) == segment.head:
                del members[block]

    def _close(self) -> None:
        run, self._open = self._open, None
        if run is None or run.token != self.collapser.token():
            return
        context = self.cache.context_name
        segments = self.segments.setdefault(context, {})
        old = segments.get(run.head)
        keys = {stream: fold_key(run.head, run.tail, stream) for stream in run.sums}
        if old is not None and old.keys != keys:
            self._drop(context, old)
        for stream, sums in run.sums.items():
            if any(f is None for f in sums.features):
                raise RuntimeError(f"cache.forecast_step=collapsed: a branch of {run.head}..{run.tail} was not "
                                   f"called on this full step; use cache.forecast_step=per_block for this model")
            self.cache.update(keys[stream], tuple(sums.features))
        segments[run.head] = Segment(run.head, run.tail, run.blocks, {s: m.kinds for s, m in run.sums.items()}, keys)
        members = self.members.setdefault(context, {})
        for block in run.blocks:
            previous = members.get(block)
            if previous is not None and previous != run.head and previous in segments:
                self._drop(context, segments.pop(previous))  # the block moved to another run
            members[block] = run.head
        self._recorded.setdefault(context, set()).add(run.head)
        self.folded_runs += 1

    # ---------------------------------------------------------------------------------- forecast steps
    def segment(self, name: str) -> Segment | None:
        return self.segments.get(self.cache.context_name, {}).get(name)

    def member(self, name: str) -> bool:
        """Whether block ``name`` is in a folded run of the current context (it has no per-branch factors)."""
        return name in self.members.get(self.cache.context_name, {})

    def forecast(self, segment: Segment, head, read: Callable) -> dict[str, torch.Tensor]:
        """``x_L = x_0 + sum_j m_j sum_i w_i D_ji`` per stream of a folded run, at its head: the multipliers ``m``
        (G, B, C) are ones with the gated rows copied in, so the coefficients cost a few kernels whatever the depth."""
        outs = {}
        for stream, kinds in segment.streams.items():
            x0 = read(stream)
            key = segment.keys[stream]
            states = self.cache.factors(key)
            groups = len(states)
            arena = self._arena(key, states[0].tensors[0], groups)
            per = arena.per_gate
            weights = [0.0] * (groups * per)
            for j, state in enumerate(states):
                slots = arena.adopt(j, state.tensors)
                if slots is None or tuple(x0.shape) != arena.shape:
                    raise RuntimeError(f"{segment.head}..{segment.tail}: the stream {stream!r} has the shape "
                                       f"{tuple(x0.shape)} on this forecast step, its folded record "
                                       f"{arena.shape}; use cache.forecast_step=per_block for this model")
                for slot, w in zip(slots, self.cache.weights_of(state), strict=True):
                    weights[slot] = w
            batch, channels = x0.shape[0], x0.shape[-1]
            rows = torch.ones(groups, batch, channels, device=x0.device)
            for j, kind in enumerate(kinds):
                if kind[0] != "one":
                    rows[j].copy_(self._multiplier(kind[1], head, read))
            w = weights_on(weights, x0.device).view(groups, per, 1, 1)
            coeffs = (w * rows.unsqueeze(1)).view(groups * per, batch, channels)
            outs[stream] = stream_update(x0, arena.data, coeffs)
        return outs

    @staticmethod
    def _multiplier(gate, head, read) -> torch.Tensor:
        """The time-varying part of a folded group's gate on this step: a row of its input, or its chunk."""
        row = _table_input_row(gate, read(gate.input)) if isinstance(gate, TableGate) else \
            _chunk_row(gate, head.block, read)
        if row is None:
            raise RuntimeError(f"{head.name}: its gate input {gate.input!r} holds one row per token on this forecast "
                               f"step but one per sample on the last full step; use cache.forecast_step=per_block")
        return row

    def _arena(self, key: str, like: torch.Tensor, groups: int) -> Arena:
        arenas = self.collapser.arenas
        arena_key = (self.cache.context_name, key)
        arena = arenas.get(arena_key)
        if arena is None or not arena.fits(like) or arena.data.shape[0] != groups * self.collapser.per_gate:
            arena = arenas[arena_key] = Arena(tuple(like.shape), like.dtype, like.device, groups,
                                              self.collapser.per_gate)
        return arena

    def describe(self) -> str | None:
        """One line for :func:`taylorseer.summary`."""
        if not self.eligible:
            return None
        done = f"; {self.folded_runs} runs recorded so" if self.folded_runs else ""
        return (f"forecast_step=collapsed: {len(self.eligible)} blocks fold their branches into one feature per gate "
                f"group and run where they can (ungated, a shared chunk, a table row with fp32 factors: "
                f"taylorseer.attach.fold){done}")
