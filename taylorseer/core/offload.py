"""Offloaded factors fetched one module ahead (``cache.offload=true`` with ``cache.prefetch=true``).

With ``offload`` the factors live in pinned host memory and come back to the accelerator whenever a module
needs them: on a forecast step to forecast, on a full step to form the differences (then the new factors go
back to the host). Plain offload copies on the compute stream, so every copy waits for the compute before
it and the compute after it waits for the copy. With ``prefetch`` every host<->device copy goes through
one side stream instead, and when module ``m`` takes its factors the factors of the module that came after
``m`` last time are already requested: their copy runs while ``m`` computes.

What a prefetch needs to know is the order of the modules, learned as they ask (per cache context and per
kind: forecast or update). The transition from the last module of a step to the first of the next is
learned too, so the first module of a step is prefetched at the end of the previous one. A prefetched copy
is used only if the module's host factors are still the ones it copied (the cache replaces a module's
list of factors at every update), else it is dropped and counted as wasted; a module nobody prefetched is
fetched when it asks (a miss). Values are the same either way: copies are exact.

Ordering (CUDA): host buffers are only ever read and written on the side stream, so a fetch always sees
the last store; a fetch's consumer waits on its event, a store waits for the compute that produced its
values, and ``record_stream`` keeps each device buffer alive until the stream that last uses it is done.
On a CPU there is no stream: copies are immediate (and with CPU factors, offload itself moves nothing).

Counted in :class:`PrefetchStats` (hits, misses, wasted copies, bytes over the host link), no timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .store import ScaledFactor


@dataclass
class PrefetchStats:
    hits: int = 0  # fetches already requested when the module asked
    misses: int = 0  # fetches requested when the module asked
    wasted: int = 0  # prefetched copies dropped (the factors changed or nobody asked)
    bytes_to_device: int = 0
    bytes_to_host: int = 0


def _tensors(factors) -> list[torch.Tensor]:
    return [t for f in factors for t in ((f.data, f.scale) if isinstance(f, ScaledFactor) else (f,))]


def _nbytes(factors) -> int:
    return sum(t.nbytes for t in factors)


class Copies:
    """Immediate copies (CPU, or any device without streams)."""

    def fetch(self, factors, device):
        return [f.to(device, non_blocking=True) for f in factors], None

    def ready(self, factors, event) -> None:
        pass

    def store(self, factors, spares, to_host: Callable):
        return [to_host(f, s) for f, s in zip(factors, spares, strict=False)]


class CudaCopies(Copies):
    """Copies on one side stream, ordered with the compute stream by events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def fetch(self, factors, device):
        with torch.cuda.stream(self.stream):
            out = [f.to(device, non_blocking=True) for f in factors]
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def ready(self, factors, event) -> None:
        main = torch.cuda.current_stream(self.device)
        main.wait_event(event)
        for t in _tensors(factors):
            t.record_stream(main)  # allocated on the side stream, used on this one

    def store(self, factors, spares, to_host: Callable):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the values are computed
        with torch.cuda.stream(self.stream):
            for t in _tensors(factors):
                t.record_stream(self.stream)  # freed on the compute stream, read here until the copy is done
            return [to_host(f, s) for f, s in zip(factors, spares, strict=False)]


@dataclass
class _Pending:
    sources: list  # the host lists of factors copied (identity: unchanged until the module's next update)
    factors: list  # per output tensor: the device copies
    event: object


@dataclass
class _Track:
    """One (context, kind): the order modules ask in, and the copy requested ahead."""

    last: str | None = None
    next_of: dict[str, str] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)


class Prefetcher:
    """Brings offloaded factors back one module ahead of their use (see the module docstring)."""

    def __init__(self, copies: Copies | None = None):
        self._copies = copies
        self._tracks: dict[tuple[str, str], _Track] = {}
        self.stats = PrefetchStats()

    def copies(self, device: torch.device) -> Copies:
        if self._copies is None:
            self._copies = CudaCopies(device) if device.type == "cuda" else Copies()
        return self._copies

    def reset(self) -> None:
        """Drop pending copies (a new sampling call: the factors they copied are gone); the learned module
        order stays, it is the same in every call."""
        for track in self._tracks.values():
            self._drop(track, list(track.pending))
            track.last = None

    def take(self, context: str, kind: str, name: str, states, lookup: Callable) -> list[list]:
        """The device copies of ``states``' factors (one list per output tensor), then the next module's
        factors requested. ``lookup(name)`` gives another module's states (None when it has none)."""
        track = self._tracks.setdefault((context, kind), _Track())
        if track.last is not None and track.last != name:
            track.next_of[track.last] = name
        track.last = name
        if kind == "update":  # the module's factors are about to change: forecast copies of them are stale
            other = self._tracks.get((context, "forecast"))
            if other is not None:
                self._drop(other, [name])
        pending = track.pending.pop(name, None)
        if not any(s.tensors for s in states):  # nothing stored yet (the module's first step)
            if pending is not None:
                self._drop_one(pending)
            fetched = [[] for _ in states]
        else:
            if pending is not None and all(src is s.tensors for src, s in zip(pending.sources, states, strict=True)):
                self.stats.hits += 1
            else:
                if pending is not None:
                    self._drop_one(pending)
                self.stats.misses += 1
                pending = self._request(states)
            copies = self.copies(states[0].device)
            for factors in pending.factors:
                copies.ready(factors, pending.event)
            fetched = pending.factors
        following = track.next_of.get(name)
        if following is not None and following != name and following not in track.pending:
            nxt = lookup(following)
            if nxt and any(s.tensors for s in nxt):
                track.pending[following] = self._request(nxt)
        return fetched

    def store(self, factors, spares, to_host: Callable) -> list:
        """New factors back to the host, on the same stream as the fetches."""
        self.stats.bytes_to_host += _nbytes(factors)
        device = factors[0].device if factors else torch.device("cpu")
        return self.copies(device).store(factors, spares, to_host)

    def _request(self, states) -> _Pending:
        copies = self.copies(states[0].device)
        factors, event = [], None
        for s in states:
            fetched, event = copies.fetch(s.tensors, s.device)
            factors.append(fetched)
            self.stats.bytes_to_device += _nbytes(s.tensors)
        return _Pending([s.tensors for s in states], factors, event)

    def _drop(self, track: _Track, names) -> None:
        for name in names:
            pending = track.pending.pop(name, None)
            if pending is not None:
                self._drop_one(pending)

    def _drop_one(self, pending: _Pending) -> None:
        # Nothing to wait for: the device copy was allocated on the side stream (its memory is reused there,
        # after the copy), and the host buffers it read are only rewritten by stores on the same stream.
        self.stats.wasted += 1
