"""One-pass forecast arithmetic: ``out = residual + gate * sum_i w_i F_i`` reading every factor once.

A forecast step of a cached block is memory-bound: all it does per branch is the gated residual add
of the forecast. Today's fallback (:func:`addcmul_chain`) makes one pass per factor, each reading the
accumulator, the gate and a factor and writing the accumulator: ``3 (O+1)`` tensor passes for order O.
The fused kernels below make one pass: read the residual and each factor once, write once,
``O + 3`` passes (order 1: 4 instead of 6; order 2: 5 instead of 9). The gate is one row per sample
and costs nothing next to the tokens.

Kernels (``TAYLORSEER_FORECAST_KERNEL`` or :func:`set_forecast_kernel` chooses; ``auto`` by default):

    addcmul   today's chain of ``torch.addcmul`` (every device; the safe fallback)
    inductor  ``torch.compile`` of the formula: inductor's C++/OpenMP vectorised loop on a CPU (needs a
              C++ compiler: gcc), a Triton kernel on CUDA. The Taylor weights go in as a tensor, so the
              kernel is compiled once per (number of factors, shapes, dtypes), never per step.
    triton    a hand-written Triton kernel (CUDA): the weights are float kernel arguments (Triton does
              not specialise on float values) and the launch skips dynamo's guards.

8-bit factors (:class:`taylorseer.core.store.ScaledFactor`, ``factor_store: float8``) are dequantised on the fly:
the inductor kernel reads the 8-bit data and the scale inside its one pass (``w_i * gate * (q_i * s_i)``);
the chain dequantises each factor to the dense factor dtype first (two more passes per factor); the
hand-written Triton kernel takes dense factors only, so 8-bit ones go through the chain there.

``auto`` is ``inductor`` on a CPU with a C++ compiler for tensors of at least ``CPU_FUSE_MIN_NUMEL``
elements, else ``addcmul``. On CUDA ``auto`` is ``addcmul``: measured on an H100 (bf16, full-size
FLUX.1-dev and DiT-XL/2), a forecast step is bound by kernel launches, not bytes, and the one-pass
Triton kernel's Python launch cost more than the two aten launches it saves (FLUX O=1 2.66 s vs
2.39 s for 50 steps); ``triton`` stays selectable. A fused kernel that fails (no
compiler, an old Triton) warns once and that device falls back to ``addcmul`` for the rest of the
process: a forecast is never lost.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .store import ScaledFactor, dense

KERNELS = ("auto", "addcmul", "inductor", "triton")
# Below this many elements a CPU pass is a few microseconds and the compiled call's fixed cost (dynamo's
# guards, ~20 us) outweighs one saved pass: ``auto`` keeps the chain there (tiny test models too).
CPU_FUSE_MIN_NUMEL = 1 << 17
MAX_TRITON_FACTORS = 5  # order <= 4, the paper's largest (DiT N=4 O=4)

_setting = os.environ.get("TAYLORSEER_FORECAST_KERNEL", "auto")
_broken: set[tuple[str, str]] = set()  # (kernel, device type) that failed once in this process


def set_forecast_kernel(name: str) -> None:
    """Choose the forecast kernel for this process (see the module docstring)."""
    global _setting
    if name not in KERNELS:
        raise ValueError(f"forecast kernel {name!r} is unknown: expected one of {list(KERNELS)} "
                         f"(TAYLORSEER_FORECAST_KERNEL)")
    _setting = name


def get_forecast_kernel() -> str:
    return _setting


@contextmanager
def forecast_kernel(name: str):
    """Use kernel ``name`` inside the block (benchmarks compare them in one process)."""
    previous = _setting
    set_forecast_kernel(name)
    try:
        yield
    finally:
        set_forecast_kernel(previous)


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot find its driver
        return False
    return True


@functools.cache
def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def resolve_kernel(device: torch.device, setting: str | None = None, numel: int | None = None) -> str:
    """The kernel ``setting`` (default: the process setting) means on ``device`` for ``numel`` elements."""
    setting = setting or _setting
    kind = device.type
    if setting == "auto":
        if kind == "cpu" and _has_cxx() and (numel is None or numel >= CPU_FUSE_MIN_NUMEL):
            setting = "inductor"
        else:
            setting = "addcmul"
    if setting == "triton" and kind != "cuda":
        setting = "addcmul"  # Triton runs on CUDA only; an explicit request elsewhere is the plain chain
    if (setting, kind) in _broken:
        return "addcmul"
    return setting


# ------------------------------------------------------------------------------------------ the chain
def addcmul_chain(residual: torch.Tensor, gate: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]],
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``residual + gate * sum_i c_i F_i`` with one ``addcmul`` per factor (3 tensor passes each; an 8-bit
    factor is dequantised to its dense dtype first)."""
    for c, factor in terms:
        factor = dense(factor)
        if out is None:
            out = torch.addcmul(residual, gate, factor, value=c)
        else:
            out.addcmul_(gate, factor, value=c)
    return out


# --------------------------------------------------------------------------------------- inductor
@functools.cache
def _inductor_fn(num_factors: int, into: bool, layout: tuple, scaled: tuple[bool, ...] | None = None):
    """A compiled ``fused(residual_or_out, gate, weights, f0, ..., f{n-1})`` of its own code object.

    ``scaled[i]``: factor i is 8-bit, passed as data ``f{i}`` and scale ``s{i}``, read as
    ``f{i}.to(float32) * s{i}`` inside the same loop.

    Each arity and layout (dtypes, contiguity) gets its own function, built from source, compiled
    shape-generic (``dynamic=True``): dynamo's per-code-object recompile limit is never reached and a
    new token count reuses the kernel. The sum is in addcmul's association, ``acc + (w_i * gate) * F_i``, so the
    result differs from the chain by the rounding of one fused loop at most.
    """
    scaled = scaled or (False,) * num_factors
    names = ", ".join(f"f{i}, s{i}" if scaled[i] else f"f{i}" for i in range(num_factors))
    factor = [f"(f{i}.to(torch.float32) * s{i})" if scaled[i] else f"f{i}" for i in range(num_factors)]
    expr = "acc" + "".join(f" + weights[{i}] * gate * {factor[i]}" for i in range(num_factors))
    if into:
        body = f"    acc = out\n    out.copy_(({expr}).to(out.dtype))\n    return out\n"
        src = f"def fused_into(out, gate, weights, {names}):\n{body}"
    else:
        body = f"    acc = residual\n    return ({expr}).to(residual.dtype)\n"
        src = f"def fused(residual, gate, weights, {names}):\n{body}"
    namespace: dict = {"torch": torch}
    label = f"<taylorseer.fused n={num_factors} into={into} {layout} scaled={scaled}>"
    exec(compile(src, label, "exec"), namespace)  # noqa: S102
    fn = namespace["fused_into" if into else "fused"]
    return torch.compile(fn, fullgraph=True, dynamic=True)


def _weights_tensor(weights: list[float], device: torch.device) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32)
    if device.type == "cpu":
        return w
    # Pinned + non_blocking: no host-device synchronisation per forecast call.
    return w.pin_memory().to(device, non_blocking=True)


def inductor_gated_add(residual, gate, terms, out=None):
    weights = [float(c) for c, _ in terms]
    factors = [f for _, f in terms]
    w = _weights_tensor(weights, residual.device)
    acc = out if out is not None else residual
    scaled = tuple(isinstance(f, ScaledFactor) for f in factors)
    tensors = [t for f in factors for t in ((f.data, f.scale) if isinstance(f, ScaledFactor) else (f,))]
    layout = tuple((t.dtype, t.dim(), t.is_contiguous()) for t in (acc, gate, *tensors))
    fn = _inductor_fn(len(factors), out is not None, layout, scaled if any(scaled) else None)
    return fn(acc, gate, w, *tensors)


# ----------------------------------------------------------------------------------------- triton
@functools.cache
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gated_sum(out_ptr, res_ptr, gate_ptr, f0, f1, f2, f3, f4, w0, w1, w2, w3, w4,
                  T, C, out_sb, out_st, res_sb, res_st, gate_sb, gate_sc,
                  s0b, s0t, s1b, s1t, s2b, s2t, s3b, s3t, s4b, s4t,
                  N: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (token row, channel block); last dimension contiguous in every tensor.
        row = tl.program_id(0)
        b = row // T
        t = row - b * T
        b = b.to(tl.int64)
        t = t.to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        acc = tl.load(res_ptr + b * res_sb + t * res_st + cols, mask=mask).to(tl.float32)
        g = tl.load(gate_ptr + b * gate_sb + cols * gate_sc, mask=mask).to(tl.float32)
        s = w0 * tl.load(f0 + b * s0b + t * s0t + cols, mask=mask).to(tl.float32)
        if N > 1:
            s += w1 * tl.load(f1 + b * s1b + t * s1t + cols, mask=mask).to(tl.float32)
        if N > 2:
            s += w2 * tl.load(f2 + b * s2b + t * s2t + cols, mask=mask).to(tl.float32)
        if N > 3:
            s += w3 * tl.load(f3 + b * s3b + t * s3t + cols, mask=mask).to(tl.float32)
        if N > 4:
            s += w4 * tl.load(f4 + b * s4b + t * s4t + cols, mask=mask).to(tl.float32)
        acc += g * s
        tl.store(out_ptr + b * out_sb + t * out_st + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return gated_sum


def _triton_layout(residual, gate, factors, out) -> str | None:
    """Why the Triton kernel cannot take these tensors (None: it can)."""
    if not 1 <= len(factors) <= MAX_TRITON_FACTORS:
        return f"{len(factors)} factors (at most {MAX_TRITON_FACTORS})"
    if any(isinstance(f, ScaledFactor) for f in factors):
        return "8-bit factors (the chain dequantises them)"
    if residual.dim() != 3 or gate.dim() != 3 or gate.shape[1] != 1:
        return "shapes other than residual (B, T, C) and gate (B, 1, C)"
    tensors = [residual, *factors] + ([out] if out is not None else [])
    if any(t.shape != residual.shape or t.stride(-1) != 1 or t.device != residual.device for t in tensors):
        return "factors of another shape or device, or a last dimension that is not contiguous"
    if gate.shape[0] not in (1, residual.shape[0]) or gate.shape[2] != residual.shape[2]:
        return "a gate that does not broadcast over (B, 1, C)"
    return None


def triton_gated_add(residual, gate, terms, out=None):
    import triton

    factors = [f for _, f in terms]
    weights = [float(c) for c, _ in terms]
    reason = _triton_layout(residual, gate, factors, out)
    if reason is not None:
        return addcmul_chain(residual, gate, terms, out)  # a layout we do not handle: the chain, every time
    B, T, C = residual.shape
    target = out if out is not None else torch.empty_like(residual, memory_format=torch.contiguous_format)
    source = out if out is not None else residual
    pad = MAX_TRITON_FACTORS - len(factors)
    ptrs = factors + [factors[0]] * pad
    strides = [s for f in ptrs for s in (f.stride(0), f.stride(1))]
    gate_sb = gate.stride(0) if gate.shape[0] > 1 else 0
    block = min(1024, triton.next_power_of_2(C))
    grid = (B * T, triton.cdiv(C, block))
    _triton_kernel()[grid](target, source, gate, *ptrs, *(weights + [0.0] * pad), T, C,
                           target.stride(0), target.stride(1), source.stride(0), source.stride(1),
                           gate_sb, gate.stride(2), *strides, N=len(factors), BLOCK=block)
    return target


_FUSED = {"inductor": inductor_gated_add, "triton": triton_gated_add}


# ----------------------------------------------------------------------------------- accounting
@dataclass
class TrafficRecord:
    kernel: str
    num_factors: int
    bytes_moved: int  # bytes read + written by the kernel passes, from the tensors they touch


class _Traffic:
    records: list[TrafficRecord] | None = None


@contextmanager
def count_traffic():
    """Record every gated add's kernel and bytes moved inside the block (a list of TrafficRecord).

    Counted from the tensors each pass touches: the chain reads the accumulator (or residual), the
    gate and one factor and writes the accumulator, per factor; a fused kernel reads the residual,
    the gate and every factor once and writes once. (The chain's pass structure is checked with a
    dispatch-mode op count, the fused one with inductor's kernel count, in the tests.)
    """
    previous, _Traffic.records = _Traffic.records, []
    try:
        yield _Traffic.records
    finally:
        _Traffic.records = previous


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _factor_nbytes(f) -> int:
    """Bytes a pass reads from a factor: an 8-bit one's data and its scale (each scale once, however broadcast)."""
    if not isinstance(f, ScaledFactor):
        return _nbytes(f)
    scales = 1
    for size, stride in zip(f.scale.shape, f.scale.stride(), strict=True):
        scales *= size if stride else 1
    return _nbytes(f.data) + scales * f.scale.element_size()


def _dense_nbytes(f) -> int:
    """Bytes of a factor in its dense dtype (what addcmul reads of it)."""
    if not isinstance(f, ScaledFactor):
        return _nbytes(f)
    return f.data.numel() * torch.empty((), dtype=f.dtype).element_size()


def _dequantize_nbytes(f) -> int:
    """Extra bytes the chain moves to dequantise an 8-bit factor (ScaledFactor.dequantize): the cast reads
    the data and writes the dense dtype, the in-place multiply reads it and the scale and writes it."""
    return _factor_nbytes(f) + 3 * _dense_nbytes(f) if isinstance(f, ScaledFactor) else 0


def _record(kernel: str, residual, gate, factors, out) -> None:
    acc = _nbytes(out if out is not None else residual)
    if kernel == "addcmul":
        moved = sum(2 * acc + _nbytes(gate) + _dense_nbytes(f) + _dequantize_nbytes(f) for f in factors)
    else:
        moved = 2 * acc + _nbytes(gate) + sum(_factor_nbytes(f) for f in factors)
    _Traffic.records.append(TrafficRecord(kernel, len(factors), moved))


def record_forecast(factors, out_dtype: torch.dtype) -> None:
    """Count a materialised forecast (``ForecastCache.forecast``: a cached module whose output is returned, not
    folded into a gated add), then its cast to ``out_dtype``. Dense factors: one add per factor after the
    first (read both, write one; then read the sum and a factor, write the sum). 8-bit factors
    (:func:`taylorseer.core.store.forecast_from`): the first dequantised, each further one cast (read 1 byte,
    write the dense dtype) and ``addcmul_``-ed into the sum with its scale (read the sum, the cast and the
    scale, write the sum)."""
    if _Traffic.records is None or not factors:
        return
    first, dense_bytes, k = factors[0], _dense_nbytes(factors[0]), len(factors)
    if isinstance(first, ScaledFactor):
        moved = _dequantize_nbytes(first) + sum(_factor_nbytes(f) + 4 * dense_bytes for f in factors[1:])
    else:
        moved = (3 * k - 3) * dense_bytes if k > 1 else 0
    if first.dtype != out_dtype:
        numel = first.data.numel() if isinstance(first, ScaledFactor) else first.numel()
        moved += dense_bytes + numel * torch.empty((), dtype=out_dtype).element_size()
    _Traffic.records.append(TrafficRecord("forecast", k, moved))


def gated_add(residual, gate, terms, out=None):
    """Dispatch ``residual + gate * sum c_i F_i`` to the kernel chosen for ``residual``'s device."""
    if not terms:
        return out
    if torch.compiler.is_compiling():
        return addcmul_chain(residual, gate, terms, out)  # inside a compiled graph inductor fuses the chain
    kernel = resolve_kernel(residual.device, numel=residual.numel())
    if len(terms) == 1 and not isinstance(terms[0][1], ScaledFactor):
        kernel = "addcmul"  # one dense factor: addcmul already is a single pass
    if kernel != "addcmul":
        if kernel == "triton" and _triton_layout(residual, gate, [f for _, f in terms], out) is not None:
            kernel = "addcmul"
    if _Traffic.records is not None:
        _record(kernel, residual, gate, [f for _, f in terms], out)
    if kernel == "addcmul" or residual.device.type == "meta":
        # (meta: shapes only, nothing to run; the bytes were counted as the chosen kernel moves them)
        return addcmul_chain(residual, gate, terms, out)
    try:
        return _FUSED[kernel](residual, gate, terms, out)
    except Exception as error:  # no compiler, a driver problem: fall back for good, say so once
        _broken.add((kernel, residual.device.type))
        warnings.warn(f"taylorseer: the {kernel!r} forecast kernel failed on {residual.device.type} "
                      f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                      f"using the addcmul chain from now on (TAYLORSEER_FORECAST_KERNEL=addcmul skips the try)",
                      RuntimeWarning, stacklevel=3)
        return addcmul_chain(residual, gate, terms, out)
