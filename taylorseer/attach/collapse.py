"""The collapsed forecast step: a run of described blocks as one update per residual stream.

On a forecast step a described block only adds gated forecasts to its residual streams, and reads nothing of
them (no attention, no norm runs). So a run of such blocks, each fed the previous one's outputs, is

    x_L = x_0 + sum_{b in run} sum_{k in branches of b} g_bk(c) * sum_i w_i D_bki          (per stream)

and is computed at the run's first block (its *head*): every gate of the run from one matmul per conditioning
input (the gate rows of all the run's modulation Linears stacked once, or a gather from the tables), the
factors of the stream read from one :class:`taylorseer.core.arena.Arena` in one pass
(:func:`taylorseer.core.arena.stream_update`). The run's other blocks pass their inputs through. The number of
kernels does not grow with the number of blocks.

What makes a run is checked, never assumed. On every full step (the blocks run whole) each block's stream inputs
must be the very tensors the block called before it returned, and its gate inputs the same tensors as that
block's (``temb``, ``c``): work between blocks (a ControlNet residual, a concatenation, a cast) breaks the run
there and that part stays per block. On forecast steps the followers check the same identities and refuse
(RuntimeError) a model whose calls changed under the cache. Blocks or settings the collapsed form does not cover
run per block: ``short=False`` descriptions, optional branches (FLUX's IP-adapter output), factors stored over
several streams and sliced (``split_storage="whole"``), per-token gates, fp16 streams clipped between blocks,
8-bit factors (``factor_store``) and offloaded ones (``offload``).

``forecast_step=per_stream`` (the memory-light level) keeps no factors per branch for these blocks: on a full step
each run's stream update ``U = x_L - x_0`` (the run's last outputs minus its first block's inputs) is one recorded
feature, its factors updated by the configured forecaster, and a forecast step is ``x_L = x_0 + sum_i w_i U_i``, one
fused pass over one arena per run and stream, no gates. The runs are recorded as they are found on each full step
(a run ends where the next block is not linked to it, or where the model call ends: :meth:`Collapser.end_step`).
Gates, optional outputs, token parts and fp16 clipping do not matter to it (they are inside ``U``); ``short=False``
blocks and, under the adaptive schedule, the probe's block and those before it (computed on every step) keep their
per-branch factors and run per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.arena import Arena, stream_update, weights_on
from ..core.cache import ForecastCache
from .fold import Folder
from .run_gates import RunGates
from .spec import BlockSpec, ChunkGate, Gate, LinearGate, TableGate, assemble_returns

PER_BLOCK = object()  # Collapser.forecast's answer: run this block per block
UNIT = "stream-update:"  # cache keys of per-stream factors: UNIT + "<first block>..<last block>"


@dataclass
class _Gate:
    """One branch add of a block: the slot group ``index`` of its stream's arena."""

    key: str
    add: object  # blocks._Add
    gate: Gate | None
    stream: str
    index: int
    layouts: dict  # module -> the selections its last record stored (the block's recorders keep it)


@dataclass
class _Entry:
    name: str
    block: torch.nn.Module
    spec: BlockSpec
    read_arg: Callable
    layouts: dict
    gates: list[_Gate] = field(default_factory=list)
    returned: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()  # streams whose inputs must be the previous block's outputs
    gate_inputs: tuple[str, ...] = ()
    optional: list[_Gate] = field(default_factory=list)  # adds of outputs a module may not return (IP-adapter)


@dataclass
class _Unit:
    """A run being recorded on a full step (per_stream): its first block's stream inputs, its last block's outputs."""

    token: tuple
    head: _Entry
    tail: str
    x0: dict[str, torch.Tensor]
    outs: dict


def _streams(entry: _Entry) -> tuple[str, ...]:
    """The residual streams a block adds into (optional outputs too: per stream they are part of the update)."""
    return tuple(dict.fromkeys(g.stream for g in entry.gates + entry.optional))


def unit_key(head: str, tail: str) -> str:
    return f"{UNIT}{head}..{tail}"


def _collapsible(spec: BlockSpec, adds) -> bool:
    if not spec.short or not spec.collapse:
        return False
    for add in adds:
        gate = add.branch.gate
        if add.part is not None:
            return False
        if isinstance(gate, LinearGate) and not gate.unsqueeze:
            return False
        if gate is not None and not isinstance(gate, (LinearGate, TableGate, ChunkGate)):
            return False
    return True


class Collapser:
    """The collapsed forecast step of one attached model (one per :func:`taylorseer.apply`)."""

    def __init__(self, cache: ForecastCache):
        self.cache = cache
        self.entries: dict[str, _Entry] = {}
        self.counts: dict[str, int] = {}  # stream -> branch adds registered into it (slot groups of its arena)
        self._links: dict[str, dict[str, str]] = {}  # context -> {block: the block linked after it}
        self.arenas: dict[tuple[str, str], Arena] = {}  # (context, stream) -> arena
        self.covered: dict[str, tuple] = {}  # block -> step token of the run that already added its forecasts
        self.last_outs: dict[str, torch.Tensor] = {}
        self.head_inputs: dict[str, object] = {}
        self.heads = 0  # collapsed runs computed (for tests and summaries)
        self._previous: tuple | None = None  # (token, entry, outputs by stream, args, kwargs) of the last block call
        self.gates = RunGates()  # the gate rows of a run's adds, stacked once
        # per_stream: the run being recorded, the blocks that keep per-branch factors (name -> why) and the blocks
        # computed on every step (the adaptive schedule's probe and those before it), never in a run.
        self._open: _Unit | None = None
        self.per_branch: dict[str, str] = {}
        self.fixed: set[str] = set()
        self.units_recorded = 0  # runs recorded on full steps (for tests and summaries)
        self.folder = Folder(self)  # collapsed: runs whose gates share their time-varying part, recorded as sums

    # ---------------------------------------------------------------------------------------- building
    def register(self, name: str, block: torch.nn.Module, spec: BlockSpec, adds, layouts: dict,
                 read_arg: Callable) -> None:
        if self.per_stream:
            if not any(not a.branch.optional for a in adds):
                self.per_branch[name] = "no residual add to forecast"
                return
            # Its branches are not recorded: the run's stream update replaces them.
            self.cache.unrecorded.update(f"{name}.{module}" for module in spec.modules)
        elif not _collapsible(spec, adds):
            return
        returns = (spec.returns,) if isinstance(spec.returns, str) else spec.returns
        returned = tuple(s for s in returns if s is not None)
        entry = _Entry(name, block, spec, read_arg, layouts, returned=returned)
        for add in adds:
            stream = add.branch.into
            if add.branch.optional:  # present on a step: that step runs per block
                entry.optional.append(_Gate(add.key, add, add.branch.gate, stream, -1, layouts))
                continue
            index = self.counts.get(stream, 0)
            self.counts[stream] = index + 1
            entry.gates.append(_Gate(add.key, add, add.branch.gate, stream, index, layouts))
        entry.checks = tuple(dict.fromkeys([g.stream for g in entry.gates] + list(returned)))
        entry.gate_inputs = tuple(dict.fromkeys(g.gate.input for g in entry.gates if g.gate is not None))
        self.entries[name] = entry
        if not self.per_stream:
            self.folder.register(entry)

    @property
    def next(self) -> dict[str, str]:
        """Block -> the block linked after it in the current context (checked on its full steps: a context whose
        calls skip blocks, SD3's skip-layer guidance, has runs of its own)."""
        return self._links.setdefault(self.cache.context_name, {})

    @property
    def per_gate(self) -> int:
        config = self.cache.config
        return config.max_order + 1 + (config.forecaster == "feedback")

    @property
    def per_stream(self) -> bool:
        return self.cache.config.forecast_step == "per_stream"

    def active(self) -> bool:
        config = self.cache.config
        if config.forecast_step == "per_stream":
            return config.enabled  # 8-bit and offloaded factors too: the cache stores and fetches them
        return (config.enabled and config.forecast_step == "collapsed" and self.cache.store is None
                and not config.offload)

    def planned(self, specs: dict[str, BlockSpec], probe: torch.nn.Module | None, named: dict) -> None:
        """Every block is built (``specs``: the described ones). per_stream: the blocks not registered keep their
        per-branch factors (``short=False`` descriptions); under schedule=adaptive the probe's block and the blocks
        before it (``named``'s order) are computed on every step, so they are in no run and keep theirs too."""
        if not self.per_stream:
            return
        for name in specs:
            if name not in self.entries and name not in self.per_branch:  # register() never saw it
                self.per_branch[name] = "short=False: the block runs its own forward"
        if probe is None:
            return
        order = {n: i for i, n in enumerate(named)}
        at = next((order[n] for n, m in named.items() if m is probe), -1)
        for name, entry in self.entries.items():
            if order.get(name, len(order)) < at or any(m is probe for m in entry.block.modules()):
                self.fixed.add(name)
                self.per_branch[name] = "computed on every step (the adaptive schedule's probe or before it)"
                self.cache.unrecorded.difference_update(f"{name}.{module}" for module in entry.spec.modules)

    def describe(self) -> str | None:
        """One line for :func:`taylorseer.summary` (per_stream only)."""
        if not self.per_stream:
            return self.folder.describe()
        runs = [n for n in self.entries if n not in self.fixed]
        line = f"forecast_step=per_stream: {len(runs)} blocks forecast from their runs' stream updates"
        if self.per_branch:
            shown = "; ".join(f"{n}: {why}" for n, why in list(self.per_branch.items())[:3])
            more = ", ..." if len(self.per_branch) > 3 else ""
            line += f"; {len(self.per_branch)} per branch ({shown}{more})"
        return line

    def _token(self) -> tuple:
        cache = self.cache
        return len(cache.history), cache.context_name, cache.step

    def token(self) -> tuple:
        return self._token()

    # -------------------------------------------------------------------------------------- full steps
    def before_full(self, name: str, args: tuple, kwargs: dict) -> None:
        """A full step of block ``name`` is about to run: whether it folds into a run's sums (:mod:`.fold`)."""
        entry = self.entries.get(name)
        if entry is None or self.per_stream or not self.active():
            return
        token = self._token()

        def read(arg):
            return entry.read_arg(args, kwargs, arg)

        before, linked = self._link_to_previous(entry, read, token, gates=True)
        self.folder.before_full(entry, read, before.name if linked else None, token)

    def _link_to_previous(self, entry: _Entry, read, token: tuple, gates: bool):
        """(the block called before ``entry`` in this step or None, whether ``entry`` is linked to it)."""
        previous = self._previous if self._previous is not None and self._previous[0] == token else None
        if previous is None:
            return None, False
        _, before, outs, pargs, pkwargs = previous
        return before, self._linked(entry, read, outs, lambda a: before.read_arg(pargs, pkwargs, a), gates=gates)

    def observe(self, name: str, args: tuple, kwargs: dict, out) -> None:
        """A full step of block ``name``: link it to the block called before it, move its factors into the arenas."""
        entry = self.entries.get(name)
        if entry is None or not self.active():
            return
        token = self._token()

        def read(arg):
            return entry.read_arg(args, kwargs, arg)

        before, linked = self._link_to_previous(entry, read, token, gates=not self.per_stream)
        if before is not None:
            if linked:
                self.next[before.name] = name
            else:
                self.next.pop(before.name, None)
        outs = _outputs(entry.spec.returns, out)
        self._previous = (token, entry, outs, args, kwargs)
        if self.per_stream:
            self._record(entry, read, outs, token, linked)
            return
        config = self.cache.config
        if config.schedule == "interval" and config.interval == 1:
            return  # every step computed: nothing will read an arena
        for gate in entry.gates:
            state = self._state(gate)
            if state is not None and state.tensors:
                arena = self._arena(gate.stream, state.tensors[0])
                if arena is not None:
                    arena.adopt(gate.index, state.tensors)

    def _record(self, entry: _Entry, read, outs: dict, token: tuple, linked: bool) -> None:
        """per_stream, a full step of ``entry``: extend the run being recorded, or close it and start one here."""
        unit = self._open
        if unit is not None and unit.token != token:
            unit = self._open = None  # a step that ended without end_step (an exception): nothing to record
        if entry.name in self.fixed or self.cache.undecided:
            self._close()  # computed on every step: in no run (and nothing is recorded before the probe decides)
            return
        if unit is not None and linked and self._joins(unit.head, entry):
            unit.tail, unit.outs = entry.name, outs
            return
        self._close()
        self._open = _Unit(token, entry, entry.name, {s: read(s) for s in _streams(entry)}, outs)

    def _joins(self, head: _Entry, entry: _Entry) -> bool:
        """Whether ``entry`` may continue a per-stream run that starts at ``head`` (it is linked to the block before
        it, checked by the caller): not computed on every step, and adding only into the head's streams."""
        return entry.name not in self.fixed and set(_streams(entry)) <= set(_streams(head))

    def end_step(self) -> None:
        """The model call ended (its forward hook): record the run still open."""
        if self._open is not None:
            self._close()
        if self.folder.eligible:
            self.folder.end_step(self.cache.is_full)

    def _close(self) -> None:
        unit, self._open = self._open, None
        if unit is None or unit.token != self._token():
            return
        updates = []
        for stream in _streams(unit.head):
            out, x0 = unit.outs.get(stream), unit.x0[stream]
            if not isinstance(out, torch.Tensor) or out.shape != x0.shape:
                raise RuntimeError(f"cache.forecast_step=per_stream: the run {unit.head.name}..{unit.tail} does not "
                                   f"return its stream {stream!r} in the shape it took it, so its update cannot be "
                                   f"recorded; use cache.forecast_step=collapsed for this model")
            updates.append(out - x0)
        self.cache.update(unit_key(unit.head.name, unit.tail), tuple(updates))
        self.units_recorded += 1

    @staticmethod
    def _linked(entry: _Entry, read, outs: dict, read_before, gates: bool = True) -> bool:
        for stream in entry.checks:
            if stream not in outs or read(stream) is not outs[stream]:
                return False
        for arg in entry.gate_inputs if gates else ():  # per_stream computes no gate
            try:
                if read(arg) is not read_before(arg):
                    return False
            except TypeError:
                return False
        return True

    def _arena(self, stream: str, like) -> Arena | None:
        if not isinstance(like, torch.Tensor):
            return None  # 8-bit factors
        key = (self.cache.context_name, stream)
        arena = self.arenas.get(key)
        if arena is None or not arena.fits(like):
            arena = self.arenas[key] = Arena(tuple(like.shape), like.dtype, like.device, self.counts[stream],
                                             self.per_gate)
        return arena

    @staticmethod
    def position(gate: _Gate) -> int | None:
        """Which of the module's recorded outputs a branch add reads (as blocks._short_forward finds it)."""
        add, branch = gate.add, gate.add.branch
        if add.selection is None:
            return 0 if branch.output is None else branch.output
        layout = gate.layouts.get(branch.module, [])
        return layout.index(add.selection) if add.selection in layout else None

    def _state(self, gate: _Gate):
        """The factor record a branch add reads (as blocks._short_forward finds it), or None."""
        position = self.position(gate)
        if position is None:
            return None
        try:
            states = self.cache.factors(gate.key)
        except RuntimeError:
            return None
        return states[position] if position < len(states) else None

    # ---------------------------------------------------------------------------------- forecast steps
    def forecast(self, name: str, args: tuple, kwargs: dict):
        """A forecast step of block ``name``: the run's update at its head, the inputs passed through by its other
        blocks; :data:`PER_BLOCK` where the collapsed form does not apply."""
        entry = self.entries.get(name)
        if entry is None or not self.active():
            return PER_BLOCK

        def read(arg):
            return entry.read_arg(args, kwargs, arg)

        token = self._token()
        if self.covered.get(name) == token:
            return self._pass_through(entry, read)
        if self.per_stream and name in self.fixed:
            return PER_BLOCK
        folder = self.folder
        if not self.per_stream and folder.members.get(self.cache.context_name):
            segment = folder.segment(name)
            if segment is not None:
                return self._folded(entry, segment, read, token)
            if folder.member(name):
                raise RuntimeError(f"{name}: its branches were recorded folded into the run of "
                                   f"{folder.members[self.cache.context_name][name]}, which was not called before it "
                                   f"on this forecast step; use cache.forecast_step=per_block for this model")
        run = [entry]
        while run[-1].name in self.next and self.next[run[-1].name] in self.entries:
            follower = self.entries[self.next[run[-1].name]]
            if (follower in run or (self.per_stream and not self._joins(entry, follower))
                    or folder.member(follower.name)):
                break
            run.append(follower)
        outs = self._stream_updates(run, read) if self.per_stream else self._collapse(run, read)
        if outs is None:
            return PER_BLOCK
        self.heads += 1
        for follower in run[1:]:
            self.covered[follower.name] = token
        if not self.per_stream:  # per_stream reads no gate
            self.head_inputs = {arg: read(arg) for e in run for arg in e.gate_inputs}
        result = assemble_returns(entry.spec.returns, outs, read)
        self.last_outs = _outputs(entry.spec.returns, result)
        return result

    def _folded(self, entry: _Entry, segment, read, token: tuple):
        """A folded run's forecast at its head (:meth:`.fold.Folder.forecast`); its other blocks pass through."""
        outs = self.folder.forecast(segment, entry, read)
        self.heads += 1
        for follower in segment.blocks[1:]:
            self.covered[follower] = token
        self.head_inputs = {arg: read(arg) for name in segment.blocks for arg in self.entries[name].gate_inputs}
        result = assemble_returns(entry.spec.returns, outs, read)
        self.last_outs = _outputs(entry.spec.returns, result)
        return result

    def _pass_through(self, entry: _Entry, read):
        for stream in entry.checks:
            if read(stream) is not self.last_outs.get(stream):
                raise RuntimeError(f"{entry.name}: on this forecast step its input {stream!r} is not what the block "
                                   f"before it returned, though it was on the full steps; the collapsed forecast "
                                   f"already added this block's forecast. Use cache.forecast_step=per_block for "
                                   f"this model")
        for arg in entry.gate_inputs if not self.per_stream else ():
            if read(arg) is not self.head_inputs.get(arg):
                raise RuntimeError(f"{entry.name}: its gate input {arg!r} differs from the run's first block's on "
                                   f"this forecast step; use cache.forecast_step=per_block for this model")
        result = assemble_returns(entry.spec.returns, {}, read)
        self.last_outs = _outputs(entry.spec.returns, result)
        return result

    def _stream_updates(self, run: list[_Entry], read) -> dict:
        """per_stream: ``x_L = x_0 + sum_i w_i U_i`` for each stream of the run, from the run's recorded factors."""
        head, key = run[0], unit_key(run[0].name, run[-1].name)
        try:
            states = self.cache.factors(key)
        except RuntimeError:
            raise RuntimeError(f"cache.forecast_step=per_stream: no stream update was recorded for the blocks "
                               f"{head.name}..{run[-1].name}, which run as one on this forecast step (the model's "
                               f"blocks were called otherwise on its last full step); use "
                               f"cache.forecast_step=collapsed for this model") from None
        config = self.cache.config
        forecasts = None
        if self.cache.store is not None or config.offload:  # 8-bit or host factors: the cache's own forecast
            forecasts = self.cache.forecast(key)
            forecasts = (forecasts,) if isinstance(forecasts, torch.Tensor) else forecasts
        outs = {}
        for i, (stream, state) in enumerate(zip(_streams(head), states, strict=True)):
            x0 = read(stream)
            if forecasts is not None:
                out = torch.add(x0, forecasts[i].to(x0.dtype))
            else:
                out = self._unit_update(key, stream, x0, state)
            if x0.dtype == torch.float16 and any(stream in e.spec.clip_fp16 for e in run):
                out = out.clip(-65504, 65504)  # diffusers clips these fp16 streams after each block
            outs[stream] = out
        return outs

    def _unit_update(self, key: str, stream: str, x0: torch.Tensor, state) -> torch.Tensor:
        """``x0 + sum_i w_i U_i`` in one pass over the run's arena of this stream (one slot per factor)."""
        like = state.tensors[0]
        arena_key = (self.cache.context_name, f"{key}:{stream}")
        arena = self.arenas.get(arena_key)
        if arena is None or not arena.fits(like):
            arena = self.arenas[arena_key] = Arena(tuple(like.shape), like.dtype, like.device, 1, self.per_gate)
        slots = arena.adopt(0, state.tensors)
        if slots is None or tuple(x0.shape) != arena.shape:
            raise RuntimeError(f"cache.forecast_step=per_stream: the stream {stream!r} of {key[len(UNIT):]} has the "
                               f"shape {tuple(x0.shape)} on this forecast step but its update {arena.shape}; use "
                               f"cache.forecast_step=collapsed for this model")
        weights = [0.0] * arena.per_gate
        for slot, w in zip(slots, self.cache.weights_of(state), strict=True):
            weights[slot] = w
        batch, channels = x0.shape[0], x0.shape[-1]
        coeffs = weights_on(weights, x0.device).view(-1, 1, 1).expand(-1, batch, channels).contiguous()
        factors = arena.data.view(arena.per_gate, batch, -1, channels)
        return stream_update(x0.reshape(batch, -1, channels), factors, coeffs).view(x0.shape)

    def _collapse(self, run: list[_Entry], read) -> dict | None:
        streams: dict[str, list[tuple[_Entry, _Gate]]] = {}
        for entry in run:
            for gate in entry.gates:
                streams.setdefault(gate.stream, []).append((entry, gate))
        if any(self._state(gate) is not None for entry in run for gate in entry.optional):
            return None
        outs: dict[str, torch.Tensor] = {}
        for stream, gates in streams.items():
            try:
                x0 = read(stream)
            except TypeError:
                return None
            if x0.dtype == torch.float16 and any(stream in e.spec.clip_fp16 for e in run):
                return None  # diffusers clips fp16 streams after each block: not one update
            out = self._stream(stream, x0, gates, run[0], read)
            if out is None:
                return None
            outs[stream] = out
        return outs

    def _stream(self, stream: str, x0: torch.Tensor, gates, head: _Entry, read) -> torch.Tensor | None:
        arena = self.arenas.get((self.cache.context_name, stream))
        indices = [g.index for _, g in gates]
        if arena is None or tuple(x0.shape) != arena.shape or indices != list(range(indices[0], indices[-1] + 1)):
            return None
        per = arena.per_gate
        weights = [0.0] * (len(gates) * per)
        for _, gate in gates:
            state = self._state(gate)
            if state is None or not state.tensors:
                return None
            slots = arena.adopt(gate.index, state.tensors)
            if slots is None:
                return None
            for slot, w in zip(slots, self.cache.weights_of(state), strict=True):
                weights[slot - indices[0] * per] = w
        g = self.gates.rows([gt for _, gt in gates], [e for e, _ in gates], head, read, x0)
        if g is None:
            return None
        w = weights_on(weights, x0.device)
        batch, channels = g.shape[0], g.shape[-1]
        coeffs = (g.unsqueeze(2) * w.view(1, len(gates), per, 1)).reshape(batch, len(gates) * per, channels)
        factors = arena.data[indices[0] * per:(indices[-1] + 1) * per]
        return stream_update(x0, factors, coeffs.transpose(0, 1))

    # ------------------------------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """Bytes of the stacked gate rows (the arenas hold the factors, counted by the cache)."""
        return self.gates.nbytes()


def _outputs(returns, out) -> dict:
    if isinstance(returns, str):
        return {returns: out}
    return {s: o for s, o in zip(returns, out, strict=False) if s is not None}


