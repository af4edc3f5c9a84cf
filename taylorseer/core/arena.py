"""Factors of one residual stream in one contiguous buffer, and the one-pass update of a collapsed forecast step.

On a forecast step no block reads its input, so a run of blocks that only add gated forecasts to a stream is
one update of that stream (paper eq. 7-8 summed over the run):

    x_L = x_0 + sum_g G_g * sum_i w_i D_{g,i}  =  x_0 + sum_j K_j * A_j,      K_j = w_{i(j)} G_{g(j)}

where g runs over the gated branches into the stream (``G_g`` a (B, C) gate row), ``A`` is the :class:`Arena`
holding every factor ``D_{g,i}`` as a slot, and ``K`` the per-slot coefficient (S, B, C). :func:`stream_update`
reads every slot once and writes the stream once: one fused kernel on CUDA (Triton) whatever the number of blocks;
on a CPU, for fp32 factors, one ``addcmul_`` per slot into an accumulator that stays in cache (:func:`_chain`:
measured faster there than the compiled pass, whose S concurrent reads the prefetchers do not keep up with).

The factors stay the forecaster's: an arena slot is handed to the cache as the tensor of a factor
(:meth:`Arena.adopt`), and the forecasters update their factors in place (``sub_``, ``div_``, ``copy_`` into the
retired buffer), so after the warm-up every full step writes straight into the arena and nothing is copied. A
factor the forecaster allocated anew (the order grows, a new sampling call) is copied in once.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels import get_forecast_kernel, resolve_kernel

# Eager fallback (no compiler, or the addcmul setting): the product of a chunk of slots is materialised, at most
# this many elements at a time, so memory stays bounded at full size.
EAGER_CHUNK_NUMEL = 1 << 24
_broken: set[str] = set()  # device types where the compiled update failed once in this process


class Arena:
    """``data``: (gates * per_gate, *shape) slots; gate ``g`` owns slots ``g * per_gate .. (g + 1) * per_gate - 1``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gates: int, per_gate: int):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.per_gate = per_gate
        self.data = torch.zeros((gates * per_gate, *shape), dtype=dtype, device=device)
        numel = 1
        for size in shape:
            numel *= size
        self._slot_bytes = numel * self.data.element_size()
        self._base = self.data.data_ptr() if self.data.device.type != "meta" else None
        self._meta_slots: dict[int, int] = {}  # meta tensors have no addresses: slot by id

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def fits(self, tensor) -> bool:
        return (isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype
                and tensor.device == self.device)

    def slot_of(self, tensor: torch.Tensor) -> int | None:
        """The slot ``tensor`` is a whole view of, or None."""
        if self._base is None:
            return self._meta_slots.get(id(tensor))
        if not self.fits(tensor) or not tensor.is_contiguous():
            return None
        offset = tensor.data_ptr() - self._base
        if offset < 0 or offset % self._slot_bytes or offset // self._slot_bytes >= self.data.shape[0]:
            return None
        return offset // self._slot_bytes

    def adopt(self, gate: int, tensors: list) -> list[int] | None:
        """Move the factors ``tensors`` (a ``Factors.tensors`` list, changed in place) into gate ``gate``'s slots;
        returns the slot of each, or None when they cannot live here (shape, dtype, 8-bit, too many)."""
        if len(tensors) > self.per_gate or not all(self.fits(t) for t in tensors):
            return None
        lo = gate * self.per_gate
        slots = [self.slot_of(t) for t in tensors]
        slots = [s if s is not None and lo <= s < lo + self.per_gate else None for s in slots]
        free = [s for s in range(lo, lo + self.per_gate) if s not in slots]
        for i, s in enumerate(slots):
            if s is None:
                s = slots[i] = free.pop(0)
                view = self.data[s]
                view.copy_(tensors[i])
                tensors[i] = view
                if self._base is None:
                    self._meta_slots[id(view)] = s
        return slots


def stream_update(x0: torch.Tensor, factors: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``x0 + sum_j coeffs[j] * factors[j]`` in fp32, cast to ``x0``'s dtype: factors (S, B, T, C), coeffs (S, B, C).

    One compiled kernel where a compiler is there (the ``TAYLORSEER_FORECAST_KERNEL`` setting ``addcmul`` or a
    failed compile keep the eager form), except on a CPU with fp32 factors under ``auto`` or ``addcmul``: the chain
    of :func:`_chain` (``inductor`` still forces the compiled pass); on the ``meta`` device and inside a compiled
    graph, the formula itself.
    """
    device = x0.device
    if device.type == "meta" or torch.compiler.is_compiling():
        return _formula(x0, factors, coeffs)
    if _get_current_dispatch_mode() is not None:
        return _eager(x0, factors, coeffs)  # under a dispatch mode (an op count) dynamo compiles nothing
    if device.type == "cpu" and factors.dtype == torch.float32 and get_forecast_kernel() in ("auto", "addcmul"):
        return _chain(x0, factors, coeffs)  # see _chain: on a CPU it beats the compiled pass
    kernel = resolve_kernel(device, numel=x0.numel())  # tiny CPU bf16 streams: eager (a compiled call costs ~20 us)
    if kernel == "addcmul" and device.type == "cuda" and device.type not in _broken:
        kernel = "inductor"  # one launch instead of one per slot: worth it whenever the arena holds a few slots
    if kernel in ("inductor", "triton") and device.type not in _broken:
        layout = tuple((t.dtype, t.dim(), t.is_contiguous()) for t in (x0, factors, coeffs))
        try:
            return _compiled(layout)(x0, factors, coeffs)
        except Exception as error:  # no compiler, a driver problem: the eager form from now on, said once
            _broken.add(device.type)
            first = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"taylorseer: the compiled collapsed forecast failed on {device.type} "
                          f"({type(error).__name__}: {first}); using the eager form from now on", RuntimeWarning,
                          stacklevel=2)
    return _eager(x0, factors, coeffs)


def weights_on(values: list[float], device: torch.device) -> torch.Tensor:
    """Forecast weights as an fp32 tensor on ``device`` (CUDA: from pinned memory, without a sync)."""
    w = torch.tensor(values, dtype=torch.float32)
    return w.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else w.to(device)


def _formula(x0, factors, coeffs):
    acc = (factors * coeffs.unsqueeze(2)).sum(0, dtype=torch.float32)
    return (x0 + acc).to(x0.dtype)


@functools.cache
def _compiled(layout: tuple):
    """One compiled function per layout (dtypes, ranks, contiguity), each its own code object: dynamo's per-code
    recompile limit is never reached, and ``dynamic=True`` keeps one kernel over token counts and depths."""
    src = ("def stream_update(x0, factors, coeffs):\n"
           "    acc = (factors * coeffs.unsqueeze(2)).sum(0, dtype=torch.float32)\n"
           "    return (x0 + acc).to(x0.dtype)\n")
    namespace: dict = {"torch": torch}
    exec(compile(src, f"<taylorseer.arena {layout}>", "exec"), namespace)  # noqa: S102
    return torch.compile(namespace["stream_update"], fullgraph=True, dynamic=True)


def _chain(x0, factors, coeffs):
    """One ``addcmul_`` per slot into an fp32 accumulator: the CPU form for fp32 factors.

    The compiled pass reads all S slots at once (S concurrent memory streams) and a CPU's prefetchers do not keep
    up: measured on 2 EPYC cores, 24 slots of (1, 1024, 256) fp32 take 1.06 ms compiled and 0.85 ms chained (25 vs
    31 GB/s; 48 slots 2.35 vs 1.50 ms; 12 slots of (1, 4096, 1024) 6.7 vs 5.1 ms). Each addcmul streams one slot
    while the accumulator stays in cache. bf16 factors keep the compiled pass (mixed-dtype addcmul is slow: 1.27 vs
    0.76 ms)."""
    # Contiguous whatever x0's layout (Sana's stream comes channels-first from its patch embedding): the slots are.
    acc = x0.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    for s in range(factors.shape[0]):
        acc.addcmul_(factors[s], coeffs[s].unsqueeze(-2))
    return acc.to(x0.dtype)


def _eager(x0, factors, coeffs):
    per_slot = max(factors[0].numel(), 1) if factors.shape[0] else 1
    step = max(1, EAGER_CHUNK_NUMEL // per_slot)
    acc = None
    for lo in range(0, factors.shape[0], step):
        part = (factors[lo:lo + step] * coeffs[lo:lo + step].unsqueeze(2)).sum(0, dtype=torch.float32)
        acc = part if acc is None else acc.add_(part)
    return x0.clone() if acc is None else (x0 + acc).to(x0.dtype)
