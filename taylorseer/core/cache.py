"""The forecasting cache: per-context step counters and per-(context, module) factors.

One :class:`ForecastCache` serves one model. Its life cycle per denoiser call:

    cache.begin_step(timestep)          # root pre-hook: advance this context's step, decide full/forecast
    out = cache.run(name, fn, ...)      # each cached module: compute + update, or forecast

Contexts keep cond and uncond apart when a pipeline runs them as separate calls (diffusers
pipelines wrap them in ``transformer.cache_context("cond")``). The first step of a sampling call
clears the context's factors, so two calls in a row behave like two fresh processes.

Where a sampling call starts, in order of trust: ``begin_call(num_steps)`` (a pipeline opened its
denoising loop), diffusers' ``cache_context(..., step_index=i)``, ``reset()``; without those, a model call
after ``num_steps`` calls whose timestep went back to its start, or (without ``num_steps``) any call
whose timestep goes back. A call that runs past a known step count is an error, not a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import CacheConfig
from .forecast import Factors, make_forecaster
from .kernels import record_forecast
from .offload import Prefetcher
from .policies import PROBE, AdaptivePolicy
from .schedule import is_full_step
from .store import ScaledFactor, forecast_from, make_store

DEFAULT_CONTEXT = "default"


@dataclass
class StepRecord:
    context: str
    step: int
    full: bool
    error: float | None = None  # schedule=adaptive: the probe's relative forecast error at this step


@dataclass
class CallSummary:
    """What one sampling call did, kept by ``reset()`` (diffusers pipelines reset at their end)."""

    history: list[StepRecord]
    nbytes: int  # bytes the factors held at the end of the call (their most: the order only grows)

    def full_steps(self) -> dict[str, int]:
        """Computed steps per context (cond/uncond)."""
        out: dict[str, int] = {}
        for record in self.history:
            out[record.context] = out.get(record.context, 0) + int(record.full)
        return out


@dataclass
class _Context:
    step: int = -1  # current sampling step of this context (-1: none yet)
    position: float = 0.0  # where the current step lies on the forecaster's axis
    full: bool = True
    batch: int | None = None  # batch size of this call's model inputs (the factors' batch)
    states: dict[str, list[Factors]] = field(default_factory=dict)  # module name -> one per output tensor
    begun: bool = False  # the current call has had a step in this context
    first_t: object = None  # the call's first timestep and the last one (references; read at a boundary only)
    last_t: object = None
    # schedule=adaptive: a step is computed until the probe has decided it (undecided); what the policy counts.
    undecided: bool = False
    last_full: int = -1
    computed: int = 0


class ForecastCache:
    """Holds the configuration, the schedule position and every factor of one model."""

    def __init__(self, config: CacheConfig, num_steps: int | None = None):
        self.config = config
        self.num_steps = num_steps
        self.forecaster = make_forecaster(config.forecaster, config.max_order)
        self.store = make_store(config.factor_store, config.factor_scale)  # None: dense factors (default)
        self.prefetcher = Prefetcher() if config.offload and config.prefetch else None
        self.policy = AdaptivePolicy(config) if config.schedule == "adaptive" else None
        self.context_name = DEFAULT_CONTEXT
        self.history: list[StepRecord] = []  # one record per denoiser call, for FLOPs and tests
        self.last_call: CallSummary | None = None  # the call before the last reset()
        self.watch_timesteps = False  # nothing announces calls: a timestep going back starts a new one
        self._announced = False  # the current call was announced with its step count (begin_call)
        self._announced_step: int | None = None  # diffusers' step index for the next call of the current context
        self._first_step: int | None = None  # the pipeline's index of this call's first step (a part of the loop)
        self._contexts: dict[str, _Context] = {}
        # Context parallelism: each rank sees its own tokens of the probe, so (sum |error|, sum |probe|) is summed
        # over the ranks of one generation before the policy decides (every rank then decides alike).
        self.error_reducer: Callable[[float, float], tuple[float, float]] | None = None
        # Keys whose outputs are not recorded: branches of blocks forecast from the factors of their residual
        # stream's total update instead (forecast_step=per_stream; taylorseer.attach.collapse fills it).
        self.unrecorded: set[str] = set()
        # Keys whose full-step outputs a handler may take instead (returns True when it did): the branches of
        # blocks folded into their run's sums under the collapsed forecast step (taylorseer.attach.fold).
        self.diverted: dict[str, Callable[[str, object], bool]] = {}

    # ----------------------------------------------------------------------------------- life cycle
    def reset(self, num_steps: int | None = None) -> None:
        """Forget every factor and step counter (call at the start of a sampling call); what the
        finished call did stays readable as ``last_call``."""
        if self.history:
            self.last_call = CallSummary(list(self.history), self.nbytes())
        self._contexts.clear()
        if self.prefetcher is not None:
            self.prefetcher.reset()
        self.history.clear()
        self.context_name = DEFAULT_CONTEXT
        self._announced = False
        self._announced_step = None
        self._first_step = None
        if num_steps is not None:
            self.num_steps = num_steps

    def begin_call(self, num_steps: int | None = None, first_step: int | None = None) -> None:
        """A sampling call of ``num_steps`` denoiser calls per context starts (a pipeline opened its loop):
        fresh state, and running past ``num_steps`` within it is an error. ``first_step``: the model runs only
        a part of the pipeline's loop, ``num_steps`` steps from the pipeline's step ``first_step`` on (Wan 2.2's
        ``transformer_2``): the pipeline's step indices count from there, and its loop length is not this call's."""
        self.reset(num_steps)
        self._announced = True
        self._first_step = first_step

    def end_call(self) -> CallSummary | None:
        """Close a sampling call and return what it did. Diffusers pipelines with ``CacheMixin``
        already reset the cache when they return (then this only reads ``last_call``); for other
        callers it records the call and resets."""
        self.reset()
        return self.last_call

    def set_context(self, name: str | None, step_index: int | None = None, num_steps: int | None = None) -> None:
        """Select the context of the next denoiser calls. ``step_index``/``num_steps`` are diffusers'
        ``CacheContext`` fields where a pipeline gives them (Wan): the step is then the pipeline's own."""
        self.context_name = name or DEFAULT_CONTEXT
        if self._first_step is not None:  # a part of the pipeline's loop: its own indices and length
            step_index = None if step_index is None else step_index - self._first_step
            num_steps = None
        self._announced_step = step_index
        if num_steps is not None:
            self.num_steps = int(num_steps)

    @contextmanager
    def context(self, name: str) -> Iterator[None]:
        previous = self.context_name
        self.set_context(name)
        try:
            yield
        finally:
            self.set_context(previous)

    @property
    def _ctx(self) -> _Context:
        ctx = self._contexts.get(self.context_name)
        if ctx is None:
            ctx = self._contexts[self.context_name] = _Context()
        return ctx

    def begin_step(self, timestep: float | None = None, batch: int | None = None, *, timestep_ref=None) -> bool:
        """Advance the current context by one sampling step; returns True when it is a full step.

        ``batch`` is the batch size of the model's input: the factors are per sample, so a batch that
        changes within a sampling call (without a reset) is refused instead of broadcast. ``timestep_ref``
        is the model's timestep argument as given (a tensor is only read where a call boundary is in doubt).
        Five jobs, in order: check the cache can run, move the step counter, start or check the sampling
        call, decide full or forecast, place the step on the forecaster's axis.
        """
        self._check_ready()
        ctx = self._ctx
        announced = self._advance(ctx, timestep_ref)
        self._start_or_check_call(ctx, batch, timestep_ref, announced)
        self._decide(ctx)
        ctx.position = self._position(ctx, timestep)
        self.history.append(StepRecord(self.context_name, ctx.step, ctx.full))
        return ctx.full

    def _check_ready(self) -> None:
        """Settings that need what only the caller knows, and an adaptive step the probe never decided."""
        if self.config.last_full_steps and self.num_steps is None and self.config.enabled:
            raise ValueError(f"cache.last_full_steps={self.config.last_full_steps} needs the number of sampling "
                             f"steps: pass num_steps to taylorseer.apply, apply it to the pipeline, or call "
                             f"cache.reset(num_steps=...) before sampling")
        if self._ctx.undecided and self.config.enabled:
            raise RuntimeError(f"cache.schedule=adaptive: the probe module did not run during step {self._ctx.step} "
                               f"of context {self.context_name!r}, so nothing decided whether to compute it: give a "
                               f"module of every model call as cache.probe (e.g. the first block)")

    def _advance(self, ctx: _Context, timestep_ref) -> int | None:
        """Move the context's step counter; returns the pipeline's own step index when it gave one.

        The step is diffusers' index where the pipeline announced one (``set_context``); otherwise it counts
        calls, and starts again at 0 for a new sampling call nobody announced (the timestep went back to its
        start, or the count ran past ``num_steps`` with timesteps that do not go on)."""
        announced, self._announced_step = self._announced_step, None
        if announced is not None:
            if 0 < announced <= ctx.step:
                raise RuntimeError(
                    f"the model ran twice at sampling step {announced} in cache context {self.context_name!r}: a "
                    f"context holds one call per step. Give the extra call its own context "
                    f"(with cache.context('extra'): ...)")
            ctx.step = -1 if announced == 0 else announced - 1
        if ctx.step >= 0 and self.watch_timesteps and _went_back(ctx.first_t, ctx.last_t, timestep_ref):
            ctx.step = -1  # a new sampling call that nobody announced: the timestep is back at its start
        ctx.step += 1
        if self.num_steps is not None and ctx.step >= self.num_steps:
            if self._announced or announced is not None or _went_on(ctx.first_t, ctx.last_t, timestep_ref):
                raise RuntimeError(
                    f"the sampling call ran past num_steps={self.num_steps} (step {ctx.step} of cache context "
                    f"{self.context_name!r}): the cache's step count is shorter than the call. Pass the real number "
                    f"of steps (taylorseer.apply(..., num_steps=N) or cache.reset(num_steps=N)); if the model runs "
                    f"more than once per step, give the extra calls their own context (with cache.context('x'):)")
            ctx.step = 0  # a new sampling call that nobody announced with reset()
        return announced

    def _start_or_check_call(self, ctx: _Context, batch: int | None, timestep_ref, announced) -> None:
        """Step 0 starts the context's sampling call (no factors, this batch); later steps keep its batch."""
        if ctx.step == 0:
            ctx.states.clear()
            ctx.batch = batch
            ctx.first_t = timestep_ref
            ctx.begun = False
            ctx.last_full, ctx.computed = -1, 0
        elif batch is not None and ctx.batch is not None and batch != ctx.batch and self.config.enabled:
            raise RuntimeError(
                f"the batch size changed from {ctx.batch} to {batch} at step {ctx.step} of context "
                f"{self.context_name!r}: the cache holds features per sample and cannot forecast another batch. "
                f"Call cache.reset() (taylorseer.get_cache(model).reset()) before a sampling call with a new batch; "
                f"if the model runs more than once per step (SD3's skip_guidance_layers), give the extra call its "
                f"own context (with cache.context('extra'): ...).")
        ctx.last_t = timestep_ref

    def _decide(self, ctx: _Context) -> None:
        """Full or forecast: the schedule's answer; the adaptive policy leaves a forecast step undecided (computed
        until the probe has run, :meth:`observe_probe`)."""
        # A context's first step in a call is computed even where the schedule would forecast (a model that
        # joins at step k > 0, e.g. Wan 2.2's low-noise transformer): there is nothing to forecast from.
        ctx.full = is_full_step(ctx.step, self.config, self.num_steps) or not ctx.begun
        ctx.begun = True
        if self.policy is not None and not ctx.full and self.config.enabled:
            ctx.undecided = True
        if ctx.full and not ctx.undecided:
            ctx.last_full, ctx.computed = ctx.step, ctx.computed + 1
        ctx.full = ctx.full or ctx.undecided

    def _position(self, ctx: _Context, timestep: float | None) -> float:
        """Where the step lies on the forecaster's axis: its index, or the model's timestep."""
        if self.config.step_distance != "timestep":
            return float(ctx.step)
        if timestep is None:
            raise ValueError("cache.step_distance='timestep' needs the model's timestep; this model gives none")
        if ctx.step > 0 and float(timestep) == ctx.position and self.config.enabled:
            raise ValueError(
                f"cache.step_distance='timestep' but the timestep did not change between steps {ctx.step - 1} and "
                f"{ctx.step} ({float(timestep)!r}): distances of zero make the derivatives infinite. This model "
                f"or sampler gives no usable timestep; use cache.step_distance=index.")
        return float(timestep)

    def observe_probe(self, output) -> None:
        """schedule=adaptive: the probe module's output of this step (a forward hook calls this).

        On an undecided step the probe's real output is compared with its forecast (the configured
        forecaster on the probe's own factors); the policy computes the step when the relative L1 error
        exceeds the threshold (within the bounds on computed steps and their distance). The probe's factors
        are updated on computed steps only, like every cached module's.
        """
        if self.policy is None or not self.config.enabled:
            return
        ctx = self._ctx
        if ctx.undecided:
            error = relative_l1([self._predict(s) for s in self._factors_of(PROBE)],
                                _as_tuple(output), self.error_reducer)
            ctx.full = self.policy.decide(error, ctx.step, ctx.last_full, ctx.computed)
            ctx.undecided = False
            if ctx.full:
                ctx.last_full, ctx.computed = ctx.step, ctx.computed + 1
            record = self.history[-1]
            record.full, record.error = ctx.full, error
        if ctx.full:
            self.update(PROBE, output)

    @property
    def step(self) -> int:
        return self._ctx.step

    @property
    def is_full(self) -> bool:
        return self._ctx.full

    @property
    def undecided(self) -> bool:
        """schedule=adaptive: this step is computed until the probe decides it (nothing is recorded before)."""
        return self._ctx.undecided

    # ----------------------------------------------------------------------------- per module
    def run(self, name: str, fn: Callable, *args, **kwargs):
        """Compute ``fn(*args, **kwargs)`` and update the factors on a full step; forecast otherwise."""
        ctx = self._ctx
        if ctx.full or name not in ctx.states:
            out = fn(*args, **kwargs)
            self.update(name, out)
            return out
        return self.forecast(name)

    def run_recording(self, name: str, fn: Callable, select: Callable, *args, **kwargs):
        """Compute ``fn(*args, **kwargs)``; on a full step record ``select(output)``: the elements or token parts
        of the output that forecast steps read (a block description's branch module, never forecast itself)."""
        out = fn(*args, **kwargs)
        if self.config.enabled and self._ctx.full and name not in self.unrecorded:
            self.update(name, select(out))
        return out

    def update(self, name: str, output) -> None:
        """Record a module's real output at the current (full) step.

        Not while an adaptive step is undecided: the modules before the probe run on every step, and their
        factors are never read (they are always computed), so they are not stored for nothing."""
        ctx = self._ctx
        if not self.config.enabled or ctx.undecided or name in self.unrecorded:
            return
        divert = self.diverted.get(name)
        if divert is not None and divert(name, output):
            return
        tensors = _as_tuple(output)
        states = ctx.states.get(name)
        if states is None:
            states = ctx.states[name] = [Factors() for _ in tensors]
        # Derivatives only at full steps i > first_enhance - 2 (upstream's warm-up rule).
        derive = ctx.step > self.config.first_enhance - 2
        for state, tensor in zip(states, tensors, strict=True):
            state.out_dtype, state.device = tensor.dtype, tensor.device
        fetched = self._fetch(name, states, "update") if self.config.offload else None
        for i, (state, tensor) in enumerate(zip(states, tensors, strict=True)):
            host = state.tensors if self.config.offload else None
            if host:
                state.tensors = fetched[i]
            if self.store is None:
                self.forecaster.update(state, tensor, ctx.position, derive, self._factor_dtype(tensor))
            else:  # 8-bit factors: the same update on dequantised copies, quantised back
                self.store.update(self.forecaster, state, tensor, ctx.position, derive, self._factor_dtype(tensor))
            if self.config.offload:
                # Back to (pinned) host memory, into the buffers of the last step where they fit.
                spares = (host or []) + [None] * len(state.tensors)
                if self.prefetcher is None:
                    state.tensors = [_to_host(t, spare) for t, spare in zip(state.tensors, spares, strict=False)]
                else:
                    state.tensors = self.prefetcher.store(state.tensors, spares, _to_host)

    def spare(self, name: str, index: int, like: torch.Tensor) -> torch.Tensor | None:
        """The buffer the next :meth:`update` of ``name`` on this full step stores its output ``index`` in, where it
        fits a feature like ``like``: a feature summed straight into it is not copied. None otherwise."""
        if self.store is not None or self.config.offload:
            return None
        ctx = self._ctx
        states = ctx.states.get(name)
        if states is None or index >= len(states):
            return None
        buffer = self.forecaster.spare(states[index], ctx.step > self.config.first_enhance - 2)
        if (buffer is None or buffer.shape != like.shape or buffer.dtype != self._factor_dtype(like)
                or buffer.device != like.device or not buffer.is_contiguous()):
            return None
        return buffer

    def forget(self, name: str) -> None:
        """Drop the factors of ``name`` in the current context (a record another one replaced)."""
        self._ctx.states.pop(name, None)

    def forecast(self, name: str):
        """The forecast output of module ``name`` at the current step, in the module's output dtype
        and on its device (offloaded factors are brought back for the arithmetic)."""
        states = self._factors_of(name)
        for s in states:
            record_forecast(s.tensors, s.out_dtype)  # counted inside fused.count_traffic() only
        outs = [_detached(self._predict(s).to(s.out_dtype), s.tensors) for s in states]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _predict(self, state: Factors) -> torch.Tensor:
        if self.store is None or not isinstance(state.tensors[0], ScaledFactor):
            return self.forecaster.predict(state, self._ctx.position)  # dense factors
        # 8-bit factors: the forecaster's weights on the dequantised factors (in the factor dtype).
        weights = self.forecaster.weights(state.positions, self._ctx.position, len(state.tensors))
        return forecast_from(state.tensors, weights)

    def terms(self, name: str) -> list[list[tuple[float, torch.Tensor]]]:
        """The forecast of ``name`` as weighted factors, one list per output tensor: forecast =
        sum of weight * factor. Lets a block fold the forecast into its gated residual add
        (:func:`taylorseer.core.kernels.gated_add`) instead of materialising it. Factors come in the
        factor dtype, on the module's device; with an 8-bit store they are
        :class:`taylorseer.core.store.ScaledFactor` (gated_add reads them; any torch op dequantises them)."""
        position = self._ctx.position
        return [list(zip(self.forecaster.weights(s.positions, position, len(s.tensors)), s.tensors, strict=True))
                for s in self._factors_of(name)]

    def factors(self, name: str) -> list[Factors]:
        """The factor records of ``name`` in the current context (one per output tensor), as the cache holds them:
        a forecast step that reads them in place (:mod:`taylorseer.core.arena`) may move their tensors into
        buffers of its own, in place in ``Factors.tensors``."""
        return self._factors_of(name)

    def weights_of(self, state: Factors) -> list[float]:
        """The forecaster's weights of ``state``'s factors at the current step (forecast = sum w_i * factor_i)."""
        return self.forecaster.weights(state.positions, self._ctx.position, len(state.tensors))

    def _factors_of(self, name: str) -> list[Factors]:
        """The factors of ``name`` in the current context, on the module's device."""
        states = self._ctx.states.get(name)
        if states is None:
            raise RuntimeError(f"no factors for {name!r} in context {self.context_name!r}: the first step is full")
        if not self.config.offload:
            return states
        fetched = self._fetch(name, states, "forecast")
        return [Factors(f, s.positions, s.out_dtype, s.device) for f, s in zip(fetched, states, strict=True)]

    def _fetch(self, name: str, states: list[Factors], kind: str) -> list[list]:
        """Offloaded factors of ``name`` on the module's device, one list per output tensor; with
        ``prefetch`` through the side stream, the next module's requested ahead (:mod:`taylorseer.core.offload`)."""
        if self.prefetcher is None:
            return [[t.to(s.device, non_blocking=True) for t in s.tensors] for s in states]
        return self.prefetcher.take(self.context_name, kind, name, states, self._ctx.states.get)

    # -------------------------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """Bytes held by the factors of every context right now."""
        return sum(s.nbytes() for ctx in self._contexts.values() for states in ctx.states.values() for s in states)

    @property
    def full_step_count(self) -> int:
        return sum(r.full for r in self.history)

    def _factor_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        name = self.config.factor_dtype
        if name == "auto":
            return torch.bfloat16 if tensor.device.type == "cuda" and tensor.is_floating_point() else tensor.dtype
        return getattr(torch, name)


def _value(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return None if t.numel() == 0 or t.device.type == "meta" else float(t.flatten()[0])
    return float(t)


def _direction(first, last, now) -> float | None:
    """(now - last) * (last - first): > 0 the call goes on, < 0 the timestep turned back, None: cannot tell."""
    values = [_value(t) for t in (first, last, now)]
    if None in values:
        return None
    f, la, n = values
    return (n - la) * (la - f)


def _went_on(first, last, now) -> bool:
    d = _direction(first, last, now)
    return d is not None and d > 0


def _went_back(first, last, now) -> bool:
    d = _direction(first, last, now)
    return d is not None and d < 0


def _detached(out: torch.Tensor, factors: list) -> torch.Tensor:
    """A forecast that is a stored factor itself (order 0: FORA, or the first steps after the warm-up) is
    copied: the caller may keep or modify it in place, and the cache updates its factors in place later."""
    if any(isinstance(f, torch.Tensor) and f.data_ptr() == out.data_ptr() for f in factors):
        return out.clone()
    return out


def relative_l1(predicted, actual, reduce: Callable | None = None) -> float:
    """sum |predicted - actual| / sum |actual| over every tensor (TeaCache/FBCache's change measure).

    ``reduce(num, den) -> (num, den)`` sums both over the ranks that each hold a part of the tokens.
    Meta tensors (FLOPs counted without weights) have no values: 0, the FLOPs count decides by itself."""
    if any(a.is_meta for a in actual):
        return 0.0
    num = sum(float((p.to(a.dtype) - a).abs().sum()) for p, a in zip(predicted, actual, strict=True))
    den = sum(float(a.abs().sum()) for a in actual)
    if reduce is not None:
        num, den = reduce(num, den)
    return num / max(den, 1e-30)


def _to_host(tensor, spare=None):
    """Copy to (pinned, when CUDA is there) CPU memory for cache.offload, reusing ``spare`` if it fits."""
    if isinstance(tensor, ScaledFactor):
        fits = isinstance(spare, ScaledFactor)
        return ScaledFactor(_to_host(tensor.data, spare.data if fits else None),
                            _to_host(tensor.scale, spare.scale if fits else None), tensor.dtype)
    if tensor.device.type == "cpu":
        return tensor
    if not isinstance(spare, torch.Tensor) or spare.shape != tensor.shape or spare.dtype != tensor.dtype:
        spare = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return spare.copy_(tensor, non_blocking=True)


def _as_tuple(output) -> tuple[torch.Tensor, ...]:
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return tuple(output)
    raise TypeError(f"a cached module must return a tensor or a tuple of tensors, got {type(output).__name__}")
