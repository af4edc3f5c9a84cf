"""The gates of a collapsed run: every add's gate row, computed for the whole run at once.

:class:`taylorseer.attach.collapse.Collapser` asks :meth:`RunGates.rows` for the ``(B, n, C)`` gate rows of a run's
``n`` adds on a forecast step. Adds are grouped by how their gate is made, and each group costs one op whatever the
depth: the rows of every modulation ``Linear`` of the run are stacked once (rebuilt when a weight changes) and
computed by one ``F.linear`` of the shared activation; table gates (Wan, PixArt) are one ``index_select`` of the
shared input plus the stacked table rows; chunks of a passed-in modulation (Flux2) one gather; ungated adds get
ones. A wrapped Linear (LoRA, quantised) computes its own gate, as per block. ``None`` means the run cannot be
collapsed this step (a per-token gate, an input the head does not take): the blocks then run per block.

The gates and entries passed in are the collapser's records: ``gate.gate`` (the description's gate), ``gate.key``,
``entry.block``, ``entry.name``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import ACTIVATIONS, ChunkGate, LinearGate, _getter


def plain_linear(linear) -> bool:
    """An ``nn.Linear`` whose forward nobody changed: its gate rows can be stacked with the others."""
    return (type(linear) is torch.nn.Linear and "forward" not in linear.__dict__ and not linear._forward_hooks
            and not linear._forward_pre_hooks)


class RunGates:
    """The stacked gate rows and chunk indices of the runs of one attached model (made once, reused per step)."""

    def __init__(self):
        self._stacks: dict = {}

    def rows(self, gates: list, entries: list, head, read, x0) -> torch.Tensor | None:
        """(B, n, C): the gate row of every add, in order (ones for ungated adds)."""
        groups: dict[tuple, list[int]] = {}
        for i, gate in enumerate(gates):
            g = gate.gate
            if g is None:
                kind = ("ones",)
            elif isinstance(g, LinearGate):
                plain = plain_linear(_getter(g.linear)(entries[i].block))
                kind = ("linear", g.input, g.activation, g.gate_activation) if plain else ("module", i)
            elif isinstance(g, ChunkGate):
                kind = ("chunk", g.input, g.chunks, g.gate_activation)
            else:
                kind = ("table", g.input, g.float32, g.chunks)
            groups.setdefault(kind, []).append(i)
        values: dict[tuple, torch.Tensor] = {}
        memo: dict = {}
        for kind, members in groups.items():
            if kind[0] == "ones":
                continue
            try:
                value = self._group(kind, [gates[i] for i in members], [entries[i] for i in members], head, read,
                                    memo)
            except TypeError:
                return None  # the head does not take an input a later block's gate reads
            if value is None:
                return None
            values[kind] = value
        if list(groups) == [next(iter(groups))] and ("ones",) not in groups:
            return values[next(iter(groups))]  # one group in stream order: no copy
        batch = next((v.shape[0] for v in values.values()), x0.shape[0])
        ones = torch.ones(1, 1, x0.shape[-1], dtype=x0.dtype, device=x0.device).expand(batch, 1, -1)
        position = {i: (kind, j) for kind, members in groups.items() for j, i in enumerate(members)}
        pieces, i = [], 0
        while i < len(gates):  # consecutive members of one group as one slice
            kind, j = position[i]
            n = 1
            while i + n < len(gates) and position[i + n] == (kind, j + n):
                n += 1
            pieces.append(ones.expand(batch, n, -1) if kind[0] == "ones" else values[kind][:, j:j + n])
            i += n
        return torch.cat(pieces, dim=1)

    def _group(self, kind: tuple, gates: list, entries: list, head, read, memo):
        if kind[0] == "module":  # a wrapped Linear (LoRA, quantised): its own gate, as per block
            gate, entry = gates[0].gate, entries[0]
            return gate.compute(entry.block, read, memo)
        if kind[0] == "linear":
            _, arg, activation, gate_activation = kind
            emb = read(arg)
            if activation is not None:
                emb = ACTIVATIONS[activation](emb)
            weight, bias = self._stack(gates, entries)
            out = F.linear(emb, weight, bias)
            out = out.view(out.shape[0], len(gates), -1)
            return out if gate_activation is None else ACTIVATIONS[gate_activation](out)
        if kind[0] == "chunk":  # chunks of a modulation passed in (Flux2): one gather
            _, arg, chunks, gate_activation = kind
            t = read(arg)
            if t.dim() == 3 and t.shape[1] == 1:
                t = t[:, 0]
            if t.dim() != 2:
                return None  # one gate per token: per block
            index = self._index(gates, t.device)
            out = torch.index_select(t.reshape(t.shape[0], chunks, -1), 1, index)
            return out if gate_activation is None else ACTIVATIONS[gate_activation](out)
        _, arg, float32, chunks = kind
        t = read(arg)
        if float32:
            t = t.float()
        rows, index = self._table(gates, entries, t.device)
        if t.shape[-1] != rows.shape[-1]:  # (B, chunks * C): PixArt; (B, 1, chunks * C): LTX-Video
            t = t.reshape(*t.shape[:-1], chunks, -1)
            if t.dim() == 4 and t.shape[1] == 1:
                t = t[:, 0]
        if t.dim() != 3:
            return None  # one gate per token (Wan 2.2 TI2V, LTX-Video per token): per block
        return torch.index_select(t, 1, index) + rows

    def _stack(self, gates: list, entries: list):
        """The gate rows of every Linear, stacked once (rebuilt when a weight changes)."""
        linears = [_getter(g.gate.linear)(e.block) for g, e in zip(gates, entries, strict=True)]
        stamp = tuple((id(m.weight), m.weight._version, m.weight.device, m.weight.dtype,
                       None if m.bias is None else m.bias._version) for m in linears)
        key = ("linear", tuple((e.name, g.key, g.gate) for g, e in zip(gates, entries, strict=True)))
        found = self._stacks.get(key)
        if found is not None and found[0] == stamp:
            return found[1], found[2]
        rows, biases = [], []
        for gate, m in zip(gates, linears, strict=True):
            n = m.out_features // gate.gate.chunks
            rows.append(m.weight.detach()[gate.gate.index * n:(gate.gate.index + 1) * n])
            biases.append(None if m.bias is None else m.bias.detach()[gate.gate.index * n:(gate.gate.index + 1) * n])
        with torch.no_grad():
            weight = torch.cat(rows)
            bias = None if any(b is None for b in biases) else torch.cat(biases)
            if bias is None and any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else torch.zeros_like(r[:, 0]) for b, r in zip(biases, rows,
                                                                                                    strict=True)])
        self._stacks[key] = (stamp, weight, bias)
        return weight, bias

    def _index(self, gates: list, device) -> torch.Tensor:
        """The chunk index of every gate, as a tensor on ``device`` (made once)."""
        key = ("index", tuple(g.key for g in gates), tuple(g.gate.index for g in gates), device)
        found = self._stacks.get(key)
        if found is None:
            found = self._stacks[key] = (None, torch.tensor([g.gate.index for g in gates], dtype=torch.long,
                                                            device=device))
        return found[1]

    def _table(self, gates: list, entries: list, device):
        tables = [_getter(g.gate.table)(e.block) for g, e in zip(gates, entries, strict=True)]
        stamp = tuple((id(t), t._version, t.device, t.dtype) for t in tables) + (device,)
        key = ("table", tuple((e.name, g.key, g.gate) for g, e in zip(gates, entries, strict=True)))
        found = self._stacks.get(key)
        if found is not None and found[0] == stamp:
            return found[1], found[2]
        with torch.no_grad():
            rows = torch.stack([t.detach().reshape(g.gate.chunks, -1)[g.gate.index]
                                for g, t in zip(gates, tables, strict=True)])
        index = torch.tensor([g.gate.index for g in gates], dtype=torch.long, device=device)
        self._stacks[key] = (stamp, rows, index)
        return rows, index

    def nbytes(self) -> int:
        """Bytes of the stacked gate rows and indices."""
        return sum(t.nbytes for _, *tensors in self._stacks.values() for t in tensors if t is not None)
