"""Wall time of the forecasting cache against its bound, on all three models, in one process.

    bash scripts/benchmark.sh [--models dit flux hunyuan_video] [--rounds 3] [--json out.json] [--markdown out.md]
    bash scripts/benchmark.sh --smoke                  # tiny sizes, 1 round: checks that everything runs

Per model (mid-size random weights, families in :mod:`taylorseer_eval.bench_families`), the variants run
in alternation, one of each per round, so a drift of the machine hits them all alike:

    uncached         the model as it is
    ours O=0/1/2     this project's cache at the paper's N and warm-up (DiT N=4 W=2, FLUX N=6 W=3,
                     HunyuanVideo N=5 W=1); O=0 is reuse (FORA)
    ideal            the same schedule with every block skipped on forecast steps: the bound
    diffusers        diffusers' TaylorSeerCacheConfig at the same N and warm-up (diffusers models)

Printed per variant: median time, wall speedup (median over rounds of uncached / variant in the same
round), efficiency (speedup / the ideal's speedup), a forecast step's time as a fraction of a full step
(medians of the per-step times of the same run), the error of the final latent against the uncached
one, the bytes the cache held, and peak accelerator memory (CUDA). ``--markdown`` writes the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import taylorseer
from taylorseer.core import kernels as fused
from taylorseer.core.store import FACTOR_STORES

from .bench_families import FAMILIES, Family


@dataclass
class Variant:
    name: str
    attach: Callable[[torch.nn.Module, int], object] | None  # returns the cache (or None)
    detach: Callable[[torch.nn.Module], None] | None = None
    compiled: bool = False
    attention: str = "sdpa"
    kernel: str | None = None  # forecast kernel (None: the process setting)


@dataclass
class Row:
    family: str
    variant: str
    times: list[float] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    full_step_s: float | None = None
    forecast_step_s: float | None = None
    full_steps: int | None = None
    rel_error: float | None = None
    cache_bytes: int | None = None
    peak_bytes: int | None = None
    compile_s: float | None = None
    error: str | None = None
    speedup: float | None = None
    of_ideal: float | None = None

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def forecast_fraction(self) -> float | None:
        if self.full_step_s and self.forecast_step_s is not None:
            return self.forecast_step_s / self.full_step_s
        return None


def standard_variants(family: Family, orders=(0, 1, 2), kernels=(None,), diffusers: bool = True,
                      attention: str = "sdpa", compiled: bool = False, stores=("dense",),
                      forecast_steps=("collapsed",)) -> list[Variant]:
    """uncached, ours at each order (and forecast kernel, factor store and forecast step: ``collapsed``, the
    default, or ``per_block``), ideal, diffusers' hook."""
    tag = (" compiled" if compiled else "") + ("" if attention == "sdpa" else f" {attention}")
    out = [Variant("uncached" + tag, None, compiled=compiled, attention=attention)]
    for store in stores:
        for kernel in kernels:
            for step in forecast_steps:
                for order in orders:
                    name = (f"ours O={order}" + (f" [{kernel}]" if kernel else "")
                            + ("" if store == "dense" else f" {store}")
                            + ("" if step == "collapsed" else " per-block") + tag)

                    def attach(m, s, o=order, st=store, fs=step):
                        config = dataclasses.replace(family.config(o), factor_store=st, forecast_step=fs)
                        return family.attach(m, config, s)

                    out.append(Variant(name, attach, taylorseer.remove, compiled=compiled, attention=attention,
                                       kernel=kernel))
    out.append(Variant("ideal" + tag, lambda m, s: family.attach_ideal(m, family.config(1), s), taylorseer.remove,
                       compiled=compiled, attention=attention))
    if diffusers and family.diffusers_config is not None:
        out.append(Variant("diffusers" + tag, lambda m, s: m.enable_cache(family.diffusers_config()),
                           lambda m: m.disable_cache(), compiled=compiled, attention=attention))
    return out


class StepTimer:
    """Wall time of every model call (synchronised on CUDA), from hooks on the model."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.times: list[float] = []
        self._cuda = device.type == "cuda"
        self._start = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def remove(self):
        for h in self._handles:
            h.remove()


def run_family(family: Family, variants: list[Variant], *, size: str = "mid", device="cpu",
               dtype: torch.dtype = torch.float32, steps: int = 50, rounds: int = 3,
               deadline: float | None = None, log: Callable[[str], None] = print,
               compile_estimate_s: float | None = None) -> list[Row]:
    """Time every variant ``rounds`` times in alternation; returns one Row per variant.

    With a ``deadline`` (time.time() value) a variant that would end after it is skipped: its last time
    (or the slowest seen so far), plus ``compile_estimate_s`` before a first compiled run, is the estimate.
    """
    if compile_estimate_s is None:
        compile_estimate_s = 0.0 if size == "smoke" else 90.0
    device = torch.device(device)
    model, sample = family.build(size, device, dtype)
    rows = {v.name: Row(family.name, v.name) for v in variants}
    timer = StepTimer(model, device)
    try:
        sample(model, 2)  # warm-up: first-call allocations, kernel selection
        # One untimed short run of each cached variant: the forecast kernels (the collapsed step's pass, the fused
        # gated add) compile at their first use, on a CPU inductor's C++, which would otherwise land in round 1's
        # time (the apps warm up the same way, warmup=true). 12 steps reach order 2 at every family's N and warm-up.
        for v in variants:
            if v.attach is not None and not v.compiled:
                try:
                    _run_variant(model, sample, v, Row(family.name, v.name), timer, min(steps, 12), device)
                except Exception:  # noqa: BLE001 - the timed rounds meet the same error and report it
                    _cleanup(model)
        outputs: dict[str, torch.Tensor] = {}
        for r in range(rounds):
            for v in variants:
                row = rows[v.name]
                if row.error is not None and not row.times:
                    continue
                estimate = _estimate(rows, v.name) + (compile_estimate_s if v.compiled and rows[v.name].compile_s
                                                      is None else 0.0)
                if deadline is not None and time.time() + estimate > deadline:
                    row.error = row.error or "skipped: time budget"
                    continue
                try:
                    outputs[v.name] = _run_variant(model, sample, v, row, timer, steps, device)
                    log(f"[{family.name}] round {r + 1}/{rounds} {v.name:28s} {row.times[-1]:8.3f} s")
                except Exception as error:  # one variant failing must not cost the others
                    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
                    row.error = f"{type(error).__name__}: {first}"
                    log(f"[{family.name}] {v.name}: FAILED {row.error}")
                    traceback.print_exc(limit=3, file=sys.stdout)
                    _cleanup(model)
            _round_ratios(rows, outputs)
    finally:
        timer.remove()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _summarise(rows)
    return list(rows.values())


def _estimate(rows: dict[str, Row], name: str) -> float:
    mine = rows[name].times
    if mine:
        return mine[-1]
    known = [r.times[-1] for r in rows.values() if r.times]
    return max(known) if known else 0.0


def _run_variant(model, sample, v: Variant, row: Row, timer: StepTimer, steps: int, device) -> torch.Tensor:
    from taylorseer.perf.attention import set_attention_backend
    from taylorseer.perf.compile import compile as ts_compile

    if v.attention != "sdpa":
        set_attention_backend(model, v.attention)
    cache = v.attach(model, steps) if v.attach else None
    cache = cache if isinstance(cache, taylorseer.ForecastCache) else None
    try:
        with fused.forecast_kernel(v.kernel or fused.get_forecast_kernel()):
            if v.compiled:
                ts_compile(model)
                if row.compile_s is None:  # first call compiles: timed apart, not in the run's time
                    start = time.perf_counter()
                    sample(model, steps)
                    _sync(device)
                    row.compile_s = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timer.times.clear()
            _sync(device)
            start = time.perf_counter()
            out = sample(model, steps)
            _sync(device)
            row.times.append(time.perf_counter() - start)
        step_times = list(timer.times)
        if device.type == "cuda":
            row.peak_bytes = max(row.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
        if cache is not None:
            summary = cache.end_call()
            if summary is not None:
                row.cache_bytes = summary.nbytes
                full = [s.full for s in summary.history]
                row.full_steps = sum(full)
                if len(full) == len(step_times):
                    f = [t for t, is_full in zip(step_times, full, strict=True) if is_full]
                    p = [t for t, is_full in zip(step_times, full, strict=True) if not is_full]
                    row.full_step_s = statistics.median(f) if f else None
                    row.forecast_step_s = statistics.median(p) if p else None
        elif step_times:
            row.full_step_s = statistics.median(step_times)
        return out.float().cpu()
    finally:
        _cleanup(model, v)


def _cleanup(model, v: Variant | None = None) -> None:
    from taylorseer.perf.attention import set_attention_backend
    from taylorseer.perf.compile import uncompile

    uncompile(model)
    if v is not None and v.detach is not None:
        v.detach(model)
    elif v is None:
        taylorseer.remove(model)
        if hasattr(model, "disable_cache") and getattr(model, "is_cache_enabled", False):
            model.disable_cache()
    if v is not None and v.attention != "sdpa":
        set_attention_backend(model, "sdpa")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _round_ratios(rows: dict[str, Row], outputs: dict[str, torch.Tensor]) -> None:
    """Speedups against the uncached run of the same round (and attention/compile setting)."""
    for row in rows.values():
        base = rows.get(_baseline_name(row.variant))
        if base is None or not base.times or not row.times or len(row.times) > len(base.times):
            continue
        if len(row.speedups) < len(row.times):
            row.speedups.append(base.times[len(row.times) - 1] / row.times[-1])
        reference = outputs.get(base.variant)
        if reference is not None and row.variant in outputs:
            out = outputs[row.variant]
            row.rel_error = float((out - reference).norm() / reference.norm())


def _baseline_name(variant: str) -> str:
    """'ours O=1 compiled' is measured against 'uncached compiled', 'ours O=1' against 'uncached'."""
    rest = [w for w in variant.split(" ") if w in ("compiled", "flash", "xformers")]
    return " ".join(["uncached", *rest])


def _summarise(rows: dict[str, Row]) -> None:
    for row in rows.values():
        if row.speedups:
            row.speedup = statistics.median(row.speedups)
    for row in rows.values():
        ideal = rows.get(_baseline_name(row.variant).replace("uncached", "ideal"))
        if row.speedup and ideal is not None and ideal.speedup:
            row.of_ideal = row.speedup / ideal.speedup


# ------------------------------------------------------------------------------------------- output
def format_table(rows: list[Row], title: str = "") -> str:
    lines = [title, ""] if title else []
    lines += ["| model | variant | time (s) | speedup | of ideal | forecast step / full step | full steps | "
              "rel. error vs uncached | cache MB | peak GB | compile s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.error and not r.times:
            lines.append(f"| {r.family} | {r.variant} | {r.error} | | | | | | | | |")
            continue
        lines.append("| " + " | ".join([
            r.family, r.variant, _f(r.seconds, "{:.3f}"), _f(r.speedup, "{:.2f}x"), _f(r.of_ideal, "{:.0%}"),
            _f(r.forecast_fraction, "{:.1%}"), _f(r.full_steps, "{}"), _f(r.rel_error, "{:.1e}"),
            _f(r.cache_bytes and r.cache_bytes / 1e6, "{:.1f}"), _f(r.peak_bytes and r.peak_bytes / 1e9, "{:.2f}"),
            _f(r.compile_s, "{:.1f}")]) + " |")
    return "\n".join(lines)


def _f(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def write_json_atomic(path: str, obj) -> None:
    """Temporary file + rename (no omegaconf import: the GPU script uses this too)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) | {"seconds": r.seconds, "forecast_fraction": r.forecast_fraction} for r in rows]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", default="mid", choices=["smoke", "mid", "full"])
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(fused.KERNELS),
                        help="forecast kernels to compare for our variants (default: the process setting, auto)")
    parser.add_argument("--stores", nargs="+", default=["dense"], choices=list(FACTOR_STORES),
                        help="factor stores (cache.factor_store) to compare for our variants (default: dense)")
    parser.add_argument("--forecast-steps", nargs="+", default=["collapsed"], choices=["collapsed", "per_block"],
                        help="the forecast step of the 'ours' rows (cache.forecast_step); both to compare them")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, 8 steps: checks that it all runs")
    parser.add_argument("--json", default=None, help="write the rows and setup to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.rounds, args.steps = "smoke", 1, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = dict(size=args.size, steps=args.steps, rounds=args.rounds, device=args.device,
                 threads=torch.get_num_threads(), torch=torch.__version__,
                 forecast_kernel={"cpu": fused.resolve_kernel(torch.device(args.device), numel=1 << 20)},
                 models={name: FAMILIES[name].describe.get(args.size, "") for name in args.models})
    rows: list[Row] = []
    for name in args.models:
        family = FAMILIES[name]
        variants = standard_variants(family, orders=args.orders, kernels=args.kernels or (None,), stores=args.stores,
                                     forecast_steps=args.forecast_steps)
        rows += run_family(family, variants, size=args.size, device=args.device, steps=args.steps,
                           rounds=args.rounds)
    title = (f"{args.steps} steps, {args.device} ({setup['threads']} threads), median of {args.rounds} alternating "
             f"round(s), size {args.size}: " + "; ".join(f"{k}: {v}" for k, v in setup["models"].items()))
    table = format_table(rows, title)
    print(table, flush=True)
    result = dict(setup=setup, rows=rows_to_dicts(rows))
    if args.json:
        write_json_atomic(args.json, result)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n")
    return result


if __name__ == "__main__":
    main()
