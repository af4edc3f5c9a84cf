"""The one configuration object of the forecasting cache.

Every field is validated on construction, so a bad interval or order fails before any model is
loaded, with a message that names the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .store import FACTOR_SCALES, FACTOR_STORES

FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
STEP_DISTANCES = ("index", "timestep")
FORECASTERS = ("taylor", "newton")


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
            e4m3 for the feature and e5m2 for its differences (:mod:`taylorseer.store`).
        factor_scale: what one scale of an 8-bit store covers: "token" (the channels of one token,
            default) or "channel" (the tokens of one channel of one sample). Unused when dense.
        step_distance: "index" measures distances in sampling-step indices (upstream-exact);
            "timestep" uses the model's real timestep/sigma values (normalised so the mean step
            distance is 1, which keeps derivatives on the same scale).
        forecaster: "taylor" is the upstream Taylor series from backward differences over the
            last step distance; "newton" extrapolates the Newton polynomial through the last O+1
            full steps at their real positions (exact on polynomials of degree <= O for any
            spacing).
        offload: keep the factors in pinned CPU memory (saves accelerator memory, costs a copy
            per forecast; for video models).
        prefetch: with ``offload``, copy on a side stream and request the next module's factors while
            the current module runs (CUDA; :mod:`taylorseer.offload`). Same values.
        enabled: False leaves every step computed and hooks inert (same output as no cache).
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
        for name in ("offload", "prefetch", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"cache.{name}={getattr(self, name)!r} is invalid: expected true or false")
        if self.prefetch and not self.offload:
            raise ValueError("cache.prefetch=true prefetches offloaded factors: set cache.offload=true too "
                             "(or cache.prefetch=false)")

    @property
    def tag(self) -> str:
        """Short name for run folders, e.g. ``N6-O1-W3``; ``nocache`` when disabled."""
        if not self.enabled:
            return "nocache"
        tag = f"N{self.interval}-O{self.max_order}-W{self.first_enhance}"
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
        return tag

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
