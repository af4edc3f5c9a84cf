"""The one configuration object of the forecasting cache.

Every field is validated on construction, so a bad interval or order fails before any model is
loaded, with a message that names the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .store import FACTOR_SCALES, FACTOR_STORES

FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
STEP_DISTANCES = ("index", "timestep")
FORECASTERS = ("taylor", "newton", "hermite", "feedback")
SCHEDULES = ("interval", "budget", "calibrated", "adaptive")
FORECAST_STEPS = ("collapsed", "per_block", "per_stream")
FORECAST_STEP_TAGS = {"collapsed": "", "per_block": "-pb", "per_stream": "-ps"}


@dataclass(frozen=True)
class CacheConfig:
    """How the cache decides *when* to compute and *how* to forecast.

    Attributes:
        interval: N, the distance in sampling steps between two full (computed) steps after the
            warm-up. 1 computes every step (the cache is then exact). Paper: FLUX 6, HunyuanVideo 5,
            DiT 3..5.
        max_order: O, the order of the Taylor expansion. 0 reuses the last computed feature (this
            is FORA); 1 and 2 are the paper's TaylorSeer settings.
        first_enhance: warm-up, the number of first steps that are always computed. Upstream:
            FLUX 3, DiT 2, HunyuanVideo 1. Derivatives are only formed at full steps i with
            i > first_enhance - 2 (upstream-exact).
        last_full_steps: extra full steps forced at the end of sampling (0 upstream). Needs the
            number of steps to be known (set by the sampling scripts).
        factor_dtype: dtype of the stored factors and of the forecast arithmetic. "auto" is bf16
            for CUDA features and the feature's own dtype otherwise (fp32 on CPU). With an 8-bit
            ``factor_store`` it is the dtype the factors are dequantised to.
        factor_store: how factors are kept between full steps. "dense" (default) in ``factor_dtype``;
            "float8": float8_e4m3fn with an fp32 scale (about half of bf16); "float8_e5m2":
            e4m3 for the feature and e5m2 for its differences (:mod:`taylorseer.core.store`).
        factor_scale: what one scale of an 8-bit store covers: "token" (the channels of one token,
            default) or "channel" (the tokens of one channel of one sample). Unused when dense.
        step_distance: "index" measures distances in sampling-step indices (upstream-exact);
            "timestep" uses the model's real timestep/sigma values (normalised so the mean step
            distance is 1, which keeps derivatives on the same scale).
        forecaster: "taylor" is the upstream Taylor series from backward differences over the
            last step distance; "newton" extrapolates the Newton polynomial through the last O+1
            full steps at their real positions (exact on polynomials of degree <= O for any
            spacing).
            "hermite" and "feedback" are the options of :mod:`taylorseer.core.forecast` (scaled Hermite basis;
            Taylor with the last full step's forecast error fed back), each documented with its equation.
        offload: keep the factors in pinned CPU memory (saves accelerator memory, costs a copy
            per forecast; for video models).
        prefetch: with ``offload``, copy on a side stream and request the next module's factors while
            the current module runs (CUDA; :mod:`taylorseer.core.offload`). Same values.
        enabled: False leaves every step computed and hooks inert (same output as no cache).
        schedule: which steps are computed (:mod:`taylorseer.core.schedule`). "interval" is the paper's rule
            (every ``interval``-th step after the warm-up; the default, unchanged). "budget" computes
            ``budget`` steps placed by a fixed rule, denser where diffusion features change fastest;
            "calibrated" places ``budget`` steps from a calibration file (one uncached run's per-step
            feature change); "adaptive" decides online from the forecast error of a probe module, at
            most ``budget`` computed steps (0: no bound) and at most ``interval`` steps apart.
        budget: K, the number of computed steps (warm-up included) of "budget"/"calibrated"; the most
            computed steps of "adaptive". Unused (0) with "interval".
        calibration: the calibration file of "calibrated" (written by the apps' calibrate command).
        threshold: "adaptive": a step is computed when the probe's relative L1 forecast error exceeds it.
        probe: "adaptive": the module whose output is checked on every step (computed on every step, its
            cost counted in the FLOPs); None takes the model's default (its first block).
        forecast_step: how a forecast step runs the described blocks. "collapsed" (default): each run of
            consecutive blocks that only add gated forecasts to their residual streams is one update per stream,
            ``x_L = x_0 + sum_b,k g_bk * sum_i w_i D_bki``, with every gate of the run from one batched matmul and
            the factors in one arena per stream (a number of kernels that does not grow with depth; equal to the
            per-block result to float rounding, :mod:`taylorseer.attach.collapse`). "per_block": every block adds
            its own gated forecasts in turn (the upstream-exact op order; HunyuanVideo keeps upstream's plain
            double blocks). Blocks or settings the collapsed form does not cover run per block either way.
            "per_stream": the memory-light level: the factors are those of each residual stream's total update
            over a run, ``U = x_L - x_0`` (one factor set per stream and run instead of one per branch and block),
            and a forecast step is ``x_L = x_0 + sum_i w_i U_i``, one fused add with no gates. It forecasts
            another quantity than the branches (the gates' change between full steps is extrapolated with the
            rest), so its results differ (docs/memory.md measures by how much). Blocks it does not cover
            (``short=False`` descriptions, and the adaptive schedule's probe block) keep their per-branch
            factors and run per block.
    """

    interval: int = 6
    max_order: int = 1
    first_enhance: int = 3
    last_full_steps: int = 0
    factor_dtype: str = "auto"
    factor_store: str = "dense"
    factor_scale: str = "token"
    step_distance: str = "index"
    forecaster: str = "taylor"
    offload: bool = False
    prefetch: bool = False
    enabled: bool = True
    schedule: str = "interval"
    budget: int = 0
    calibration: str | None = None
    threshold: float = 0.05
    probe: str | None = None
    forecast_step: str = "collapsed"

    def __post_init__(self) -> None:
        _check_int("interval", self.interval, minimum=1, hint="1 computes every step; the paper uses 3..7")
        _check_int("max_order", self.max_order, minimum=0, maximum=8, hint="0 is reuse (FORA); the paper uses 1..4")
        _check_int("first_enhance", self.first_enhance, minimum=0, hint="number of warm-up steps always computed")
        _check_int("last_full_steps", self.last_full_steps, minimum=0, hint="full steps forced at the end")
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        _check_choice("factor_store", self.factor_store, tuple(FACTOR_STORES))
        _check_choice("factor_scale", self.factor_scale, FACTOR_SCALES)
        _check_choice("step_distance", self.step_distance, STEP_DISTANCES)
        _check_choice("forecaster", self.forecaster, FORECASTERS)
        _check_choice("forecast_step", self.forecast_step, FORECAST_STEPS)
        for name in ("offload", "prefetch", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"cache.{name}={getattr(self, name)!r} is invalid: expected true or false")
        if self.prefetch and not self.offload:
            raise ValueError("cache.prefetch=true prefetches offloaded factors: set cache.offload=true too "
                             "(or cache.prefetch=false)")
        self._check_schedule()

    def _check_schedule(self) -> None:
        """The schedule policy's own fields: each is required by the policies that read it and refused by the
        others (a setting that silently does nothing would make a run folder lie about its settings)."""
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("budget", self.budget, minimum=0, hint="computed steps, warm-up included")
        policy = self.schedule
        if policy in ("budget", "calibrated") and self.budget < max(self.first_enhance, 1):
            raise ValueError(f"cache.budget={self.budget} is invalid with cache.schedule={policy}: expected the "
                             f"number of computed steps, at least the {max(self.first_enhance, 1)} warm-up step(s) "
                             f"(e.g. cache.budget=10)")
        if policy == "adaptive" and 0 < self.budget < max(self.first_enhance, 1):
            raise ValueError(f"cache.budget={self.budget} is invalid with cache.schedule=adaptive: expected 0 (no "
                             f"bound) or at least the {max(self.first_enhance, 1)} warm-up step(s)")
        if policy == "interval" and self.budget:
            raise ValueError(f"cache.budget={self.budget} is not used by cache.schedule=interval (the paper's rule "
                             f"computes every cache.interval-th step): set cache.schedule=budget|calibrated|adaptive "
                             f"or cache.budget=0")
        if policy == "calibrated":
            if not self.calibration:
                raise ValueError("cache.schedule=calibrated needs cache.calibration=<file>: write one with "
                                 "`bash scripts/calibrate.sh` (one uncached run of the model)")
            if not calibration_path(self.calibration).is_file():
                raise ValueError(f"cache.calibration={self.calibration!r}: no such file; write it with "
                                 f"`bash scripts/calibrate.sh ... out={self.calibration}`")
        elif self.calibration is not None:
            raise ValueError(f"cache.calibration={self.calibration!r} is only read by cache.schedule=calibrated")
        bad_threshold = (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                         or not self.threshold > 0)
        if bad_threshold:
            raise ValueError(f"cache.threshold={self.threshold!r} is invalid: expected a number > 0 (the probe's "
                             f"relative L1 forecast error above which a step is computed, e.g. 0.05)")
        if self.probe is not None and (policy != "adaptive" or not isinstance(self.probe, str) or not self.probe):
            raise ValueError(f"cache.probe={self.probe!r} is invalid: a module name, read by cache.schedule=adaptive "
                             f"only (null takes the model's first block)")

    @property
    def tag(self) -> str:
        """Short name for run folders, e.g. ``N6-O1-W3``; ``nocache`` when disabled."""
        if not self.enabled:
            return "nocache"
        # The paper's schedule keeps its tag exactly; the others name their policy and budget first.
        if self.schedule == "interval":
            policy = f"N{self.interval}"
        elif self.schedule == "budget":
            policy = f"K{self.budget}"
        elif self.schedule == "calibrated":
            policy = f"K{self.budget}-cal{calibration_digest(self.calibration)}"
        else:
            policy = f"A{self.threshold:g}-N{self.interval}-K{self.budget}"
            if self.probe:
                policy += "-p" + "".join(c if c.isalnum() else "_" for c in self.probe)
        tag = f"{policy}-O{self.max_order}-W{self.first_enhance}"
        if self.last_full_steps:
            tag += f"-E{self.last_full_steps}"
        if self.forecaster != "taylor":
            tag += f"-{self.forecaster}"
        if self.step_distance != "index":
            tag += "-ts"
        if self.factor_store != "dense":
            # -f8 / -f8e5 (e5m2 differences), c: one scale per channel instead of per token
            tag += "-f8" + ("e5" if self.factor_store == "float8_e5m2" else "")
            tag += "c" if self.factor_scale == "channel" else ""
        # -pb: per-block forecast steps (upstream's op order, other float rounding); -ps: per-stream factors (other
        # results); the default collapsed step keeps the tag it always had
        return tag + FORECAST_STEP_TAGS[self.forecast_step]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CacheConfig:
        """Build from a mapping (e.g. a Hydra node); unknown keys fail with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown cache option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)


def _check_int(name: str, value, minimum: int, maximum: int | None = None, hint: str = "") -> None:
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    bad = isinstance(value, bool) or not isinstance(value, int)
    if bad or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"cache.{name}={value!r} is invalid: expected an integer {allowed} ({hint})")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"cache.{name}={value!r} is invalid: expected one of {list(choices)}")


def calibration_path(path: str | Path) -> Path:
    """Where a calibration file is: as given (from the working directory), or, for a relative path that is not
    there, the repository's (the bundled ``assets/calibrations/...`` from any directory, as the experiments
    name them)."""
    given = Path(str(path)).expanduser()
    in_repo = Path(__file__).resolve().parents[2] / given
    return in_repo if not given.is_absolute() and not given.exists() and in_repo.is_file() else given


def calibration_digest(path: str | None) -> str:
    """6 hex digits of a file's content: run names change when the calibration behind them does."""
    return hashlib.sha256(calibration_path(path).read_bytes()).hexdigest()[:6]
