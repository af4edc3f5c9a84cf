"""Run folders, atomic writes, timing and memory: what every sampling script reports.

A run folder holds the outputs (images/videos), ``config.yaml`` (the exact config) and
``metrics.json``. Every file is written to a temporary name and renamed, so a killed run never
leaves a half-written file that a rerun would take as done.
"""

from __future__ import annotations

import functools
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.calibration import flops_of
from .distributed import is_main_process


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe short form of a prompt or label."""
    text = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    return text[:max_len] or "empty"


class WeightsNotFoundError(RuntimeError):
    """The model weights could not be loaded; the message says where we looked and what to do."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short temporary name: one derived from ``path`` would pass the 255-byte limit before ``path`` does.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs are for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_image(path: str | Path, image) -> Path:
    """Save a PIL image atomically (format from the suffix)."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return atomic_write(path, lambda p: image.save(p, format=fmt))


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing) for a read-modify-write of a run file."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# What only a sampling invocation measures: a rerun that finds every item made (and samples nothing) keeps them
MEASURED_WHILE_SAMPLING = ("peak_memory_bytes", "peak_memory_kind", "cache_bytes_per_rank", "world_size",
                           "context_parallel")


def write_metrics(out_dir: str | Path, metrics: dict, sampled: bool = True) -> Path:
    """Write ``out_dir/metrics.json``, keeping the ``eval`` section that metric commands added to it.

    Sampling owns every other key; ``taylorseer_eval`` adds ``metrics["eval"][<metric>]`` with
    :func:`record_eval`. Each entry there carries the ``num_items`` it was computed on, so a table can
    tell a metric of an older, smaller state of the folder from a current one. ``sampled=False`` (a rerun
    of a finished folder, nothing sampled): the figures of :data:`MEASURED_WHILE_SAMPLING` stay the sampling
    run's, not this process's.
    """
    path = Path(out_dir) / "metrics.json"
    with locked(Path(out_dir) / ".metrics.lock"):
        previous = read_json(path) or {}
        merged = dict(metrics)
        if not sampled:
            merged.update({k: previous[k] for k in MEASURED_WHILE_SAMPLING if k in previous})
        if "eval" in previous:
            merged["eval"] = {**previous["eval"], **metrics.get("eval", {})}
        return write_json(path, merged)


def record_eval(out_dir: str | Path, name: str, result: dict) -> Path:
    """Add (or replace) the result of metric ``name`` under ``metrics.json["eval"]``."""
    path = Path(out_dir) / "metrics.json"
    with locked(Path(out_dir) / ".metrics.lock"):
        metrics = read_json(path) or {}
        metrics.setdefault("eval", {})[name] = result
        return write_json(path, metrics)


def read_json(path: str | Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


@contextmanager
def timed(result: dict, key: str = "seconds", device=None) -> Iterator[None]:
    """Wall time of the block (device work included) into ``result[key]``."""
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    result[key] = time.perf_counter() - start


def reset_peak_memory(device=None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device=None) -> dict:
    """Peak accelerator memory since the last reset, else the process's peak resident memory."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": int(kib) * 1024, "peak_memory_kind": "process_max_rss"}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if name not in choices:
        raise ValueError(f"dtype={name!r} is invalid: expected auto, {', '.join(choices)}")
    return choices[name]


def sampling_metrics(config, flops, items: list[dict], device=None, keep_items: bool = True, **extra) -> dict:
    """The ``metrics.json`` every sampling run writes (same keys for every model), from its per-output records.

    ``flops`` is a :class:`taylorseer.FlopsReport` for one item's sampling run (or None when not counted);
    each record in ``items`` has the item's share of the wall time (``latency_s``) and the bytes the cache
    held (``cache_bytes``); records compared with the uncached run of the same seed also carry
    ``uncached_latency_s``, ``psnr`` and ``ssim``. ``keep_items=False`` leaves the records out of the
    file (50,000 DiT samples), which keeps only the totals.
    """
    seconds = sum(r.get("latency_s", 0.0) for r in items)
    out = {
        "cache": config.to_dict(),
        "cache_tag": config.tag,
        "num_items": len(items),
        "latency_s": seconds / max(len(items), 1),
        "latency_total_s": seconds,
        "cache_bytes": int(max((r.get("cache_bytes", 0) for r in items), default=0)),
        **peak_memory(device),
    }
    compared = [r for r in items if "psnr" in r]
    if compared:
        cached_s = sum(r["latency_s"] for r in compared)
        uncached_s = sum(r["uncached_latency_s"] for r in compared)
        out.update(uncached_latency_s=uncached_s / len(compared), wall_speedup=uncached_s / cached_s,
                   psnr_vs_uncached=sum(r["psnr"] for r in compared) / len(compared),
                   ssim_vs_uncached=sum(r["ssim"] for r in compared) / len(compared), num_compared=len(compared))
    if flops is not None and getattr(config, "schedule", "interval") == "adaptive":
        # A data-dependent schedule: its FLOPs are those of the computed steps the records say ran.
        counts = [_mean_full_steps(r["full_steps"]) for r in items if r.get("full_steps") is not None]
        if counts:
            flops = flops.observed(sum(counts) / len(counts))
    if flops is not None:
        out.update(
            num_steps=flops.num_steps,
            full_steps=flops.full_steps,
            compression=flops.compression,
            schedule_compression=flops.schedule_compression,
            flops_uncached=flops.flops_uncached,
            flops_total=flops.flops_total,
            flops_full_step=flops.full_step_flops,
            flops_forecast_step=flops.forecast_step_flops,
            flops_convention="torch FlopCounterMode: 2 FLOPs per multiply-add, per item",
            flops_data_dependent=flops.data_dependent,
        )
    if getattr(config, "schedule", "interval") == "calibrated" and config.enabled:
        # Paid once per calibration file, not per item: reported beside the per-item figures.
        out["flops_calibration"] = flops_of(config.calibration)
    if keep_items:
        out["items"] = items
    out.update(extra)
    return out


def _mean_full_steps(value) -> float:
    """A record's computed steps: a count, or {context: count} (cond/uncond calls) averaged."""
    if isinstance(value, dict):
        return sum(value.values()) / max(len(value), 1)
    return float(value)


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return False
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def clear_errors(tag: str, also: tuple[type[BaseException], ...] = ()) -> Callable:
    """Decorator for a command's main: settings and setup errors (ValueError, a missing file or
    weights, and ``also``) print one line ``[tag] error: ...`` on stderr and exit with status 2.

    Their messages already say the fix; anything else is a bug and keeps its traceback. Under torchrun
    or Slurm every rank meets the same settings error: only rank 0 prints it.
    """
    from omegaconf.errors import OmegaConfBaseException

    # OmegaConf's errors here are settings errors too (an interpolation to a key that is not there).
    # PermissionError: an out_root or a model folder this user cannot write or read.
    caught = (WeightsNotFoundError, ValueError, FileNotFoundError, PermissionError, OmegaConfBaseException, *also)

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except caught as err:
                if is_main_process():
                    print(f"[{tag}] error: {' '.join(str(err).split())}", file=sys.stderr)  # one line
                if _in_multirun():
                    raise  # Hydra records the failed job, goes on with the others and reports it at the end
                sys.exit(2)

        return wrapper

    return wrap


def summary_line(app: str, tag: str, metrics: dict, num_steps: int, unit: str = "image") -> str:
    """The one line an app prints at the end of a run (its metrics.json in brief)."""
    line = (f"[{app}] {tag}: {metrics.get('full_steps', '?')}/{num_steps} full steps, FLOPs compression "
            f"{metrics.get('compression', float('nan')):.2f}x, {metrics['latency_s']:.3f} s/{unit}, cache "
            f"{metrics['cache_bytes'] / 2**20:.1f} MiB")
    if "wall_speedup" in metrics:
        line += f", wall speedup {metrics['wall_speedup']:.2f}x, PSNR {metrics['psnr_vs_uncached']:.2f} dB"
        if "ssim_vs_uncached" in metrics:
            line += f", SSIM {metrics['ssim_vs_uncached']:.4f}"
    return line
