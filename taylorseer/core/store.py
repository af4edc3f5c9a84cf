"""Smaller factor stores: 8-bit float factors with a per-token (or per-channel) scale.

The dense store (``factor_store: dense``, the default) keeps every factor in the factor dtype (bf16 on
CUDA): HunyuanVideo at 480x640x65 holds 20.3 GB at O=1. An 8-bit store keeps each factor ``D_i`` as

    q_i = round_fp8(D_i / s_i),   s_i = amax(|D_i|) / fp8_max     (amax over a token's channels, or over
                                                                    a channel's tokens: ``factor_scale``)
    D_i ~= q_i * s_i                                                (dequantised on the fly)

in ``float8_e4m3fn`` (3 mantissa bits, max 448: ~2.5% RMS relative error on a Gaussian token) with one
fp32 scale per token: 1 + 4/C bytes per element (C = 3072: 1.0013), about half of bf16 and a quarter
of fp32. ``float8_e5m2`` (2 mantissa bits, 5 exponent bits) is offered for the differences, whose
dynamic range is wider than the feature's: its range is rarely what limits a scaled factor, its
mantissa always is (measured in docs/memory.md).

Correctness of the derivatives: a full step dequantises the stored factors into fp32 working copies,
runs the forecaster's own update on them (``D_{i+1} = (D_i^new - deq(D_i^old)) / d``: differences of the
exact new values and the dequantised old ones), and quantises the results back into the same 8-bit
buffers. Forecasters never see quantised values, so every forecaster works with every store.

A quantised factor is a :class:`ScaledFactor` (data + scale). It slices like a tensor (the HunyuanVideo
single blocks split a factor into video and text tokens), and any torch function given one
dequantises it first (``__torch_function__``): code written for dense factors (the ``addcmul`` chain, a
residual add) stays correct; the fused kernels read the 8-bit data and the scale directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# config value -> (format of D_0, format of the differences D_1..D_O); "dense" is no quantisation.
FACTOR_STORES = {
    "dense": None,
    "float8": (torch.float8_e4m3fn, torch.float8_e4m3fn),
    "float8_e5m2": (torch.float8_e4m3fn, torch.float8_e5m2),
}
FACTOR_SCALES = ("token", "channel")
SCALE_DTYPE = torch.float32
WORK_DTYPE = torch.float32  # dtype of the full-step update on dequantised factors


@dataclass
class ScaledFactor:
    """An 8-bit factor: ``data * scale`` stands for a factor of dtype ``dtype``.

    ``scale`` broadcasts to ``data``: ``(..., T, 1)`` per token, ``(B, 1, ..., C)`` per channel.
    """

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype  # the dense dtype this factor stands for (what ``dequantize()`` returns)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held: the 8-bit data and the scale (its own elements, not broadcast)."""
        return self.data.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``data * scale`` in ``dtype`` (default: the dense dtype): two passes. The cast is exact (every
        fp8 value is a bf16/fp16/fp32 value) and the in-place multiply computes in fp32 and rounds once,
        so this equals ``(data.float() * scale).to(dtype)``."""
        return self.data.to(dtype or self.dtype).mul_(self.scale)

    def to(self, device, non_blocking: bool = False) -> ScaledFactor:
        """Move data and scale to ``device`` (offload); dtypes never change here."""
        return ScaledFactor(self.data.to(device, non_blocking=non_blocking),
                            self.scale.to(device, non_blocking=non_blocking), self.dtype)

    def __getitem__(self, index) -> ScaledFactor:
        """The same elements of data and scale (views for basic slicing): ``f[:, :n_video]``."""
        scale = _compact(self.scale.expand(self.data.shape)[index])
        return ScaledFactor(self.data[index], scale, self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Any torch function given a ScaledFactor sees its dense value: correct whatever the consumer.
        return func(*_dense_all(args), **{k: _dense_all(v) for k, v in (kwargs or {}).items()})


def dense(factor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A factor's dense value: ScaledFactor dequantised, a tensor as it is (cast when ``dtype`` is given)."""
    if isinstance(factor, ScaledFactor):
        return factor.dequantize(dtype)
    return factor if dtype is None else factor.to(dtype)


def forecast_from(factors: list[ScaledFactor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i F_i`` (``w_0 == 1``) from 8-bit factors in their dense dtype: the first dequantised, each
    further one cast and multiplied by its scale and weight into the sum in one ``addcmul_`` (fp32 inside,
    one rounding), so no dense copy of a further factor is kept."""
    out = factors[0].dequantize()
    for weight, factor in zip(weights[1:], factors[1:], strict=True):
        out.addcmul_(factor.data.to(out.dtype), factor.scale, value=weight)
    return out


def _dense_all(value):
    if isinstance(value, ScaledFactor):
        return value.dequantize()
    if isinstance(value, (tuple, list)):
        return type(value)(_dense_all(v) for v in value)
    return value


def _compact(scale: torch.Tensor) -> torch.Tensor:
    """Broadcast (stride-0) dimensions of an indexed scale back to size 1: the scale stays small."""
    for dim, (size, stride) in enumerate(zip(scale.shape, scale.stride(), strict=True)):
        if stride == 0 and size > 1:
            scale = scale.narrow(dim, 0, 1)
    return scale


def scale_dims(ndim: int, axis: str) -> tuple[int, ...]:
    """Dimensions one scale's amax runs over, for a factor of ``ndim`` dimensions: the channels of a token
    (``token``: the last), or every token of a channel within a sample (``channel``: all but the first and
    the last; all but the last below 3-D)."""
    if ndim == 0:
        return ()
    if axis == "token" or ndim == 1:
        return (ndim - 1,)
    if ndim == 2:
        return (0,)
    return tuple(range(1, ndim - 1))


def stored_nbytes(shape, num_factors: int, factor_store: str = "dense", factor_scale: str = "token",
                  dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact bytes of ``num_factors`` stored factors of one tensor of ``shape``: dense ``numel x itemsize``;
    8-bit ``numel x 1`` plus one fp32 scale per token (``numel / C``) or per channel and sample."""
    numel = math.prod(shape)
    if FACTOR_STORES[factor_store] is None:
        return num_factors * numel * torch.empty((), dtype=dtype).element_size()
    reduced = math.prod(shape[d] for d in scale_dims(len(shape), factor_scale))
    scales = numel // reduced if reduced else 0
    return num_factors * (numel + scales * torch.empty((), dtype=SCALE_DTYPE).element_size())


def quantize(tensor: torch.Tensor, fmt: torch.dtype, axis: str, dtype: torch.dtype,
             spare: ScaledFactor | None = None) -> ScaledFactor:
    """``tensor`` as an 8-bit factor of format ``fmt`` with a scale per ``axis``; into ``spare``'s buffers
    when their shapes and format fit (no allocation in the steady state)."""
    fmax = torch.finfo(fmt).max
    x = tensor.to(SCALE_DTYPE)
    dims = scale_dims(x.dim(), axis)
    amax = x.abs().amax(dim=dims, keepdim=True) if dims else x.abs()
    # An all-zero token keeps a tiny positive scale (0/0 would be NaN); its data is 0 either way.
    scale = amax.clamp_min(torch.finfo(SCALE_DTYPE).tiny).div_(fmax)
    # Clamp: amax / (amax / fmax) may round a hair above fmax, and e5m2 casts overflow to inf.
    scaled = (x / scale).clamp_(-fmax, fmax)
    if spare is not None and spare.data.shape == tensor.shape and spare.data.dtype == fmt \
            and spare.data.device == tensor.device and spare.scale.shape == scale.shape:
        spare.data.copy_(scaled)
        spare.scale.copy_(scale)
        spare.dtype = dtype
        return spare
    return ScaledFactor(scaled.to(fmt), scale, dtype)


class QuantizedStore:
    """Keeps a :class:`taylorseer.core.forecast.Factors` record's factors in 8 bits between full steps."""

    def __init__(self, name: str, axis: str):
        if name not in FACTOR_STORES or FACTOR_STORES[name] is None:
            raise ValueError(f"factor store {name!r} is not an 8-bit store: expected one of "
                             f"{[k for k, v in FACTOR_STORES.items() if v is not None]}")
        self.name, self.axis = name, axis
        self.first_format, self.difference_format = FACTOR_STORES[name]

    def format_of(self, order: int) -> torch.dtype:
        return self.first_format if order == 0 else self.difference_format

    def update(self, forecaster, state, feature: torch.Tensor, position: float, derive: bool,
               dtype: torch.dtype) -> None:
        """The forecaster's full-step update on dequantised fp32 copies, then quantised back in place."""
        if not feature.is_floating_point():  # nothing to gain, and no scale to take: dense
            forecaster.update(state, feature, position, derive, dtype)
            return
        stored = list(state.tensors)
        state.tensors = [dense(f, WORK_DTYPE) for f in stored]
        forecaster.update(state, feature, position, derive, WORK_DTYPE)
        spares = [f for f in stored if isinstance(f, ScaledFactor)]
        out = []
        for order, tensor in enumerate(state.tensors):
            fmt = self.format_of(order)
            spare = next((s for s in spares if s.data.dtype == fmt and s.data.shape == tensor.shape), None)
            if spare is not None:
                spares.remove(spare)
            out.append(quantize(tensor, fmt, self.axis, dtype, spare))
        state.tensors = out


def make_store(name: str, axis: str = "token") -> QuantizedStore | None:
    """None for the dense store (the cache then runs today's path untouched), else a QuantizedStore."""
    if name not in FACTOR_STORES:
        raise ValueError(f"unknown factor store {name!r}: expected one of {list(FACTOR_STORES)}")
    if axis not in FACTOR_SCALES:
        raise ValueError(f"unknown factor scale {axis!r}: expected one of {list(FACTOR_SCALES)}")
    return None if FACTOR_STORES[name] is None else QuantizedStore(name, axis)
