"""The model-agnostic half of a diffusers sampling run: items and seeds, resume, per-call probes, errors.

Nothing here knows about HunyuanVideo; FLUX's runner has the same pieces, and both can move into the
core (``taylorseer/runs.py``) as they are:

* :func:`plan_items`      prompts x outputs-per-prompt -> items with seed ``seed + index`` and file names
* :func:`kept_records`    the per-item records of earlier (preempted) runs whose files are still there
* :class:`StepProbe`      per pipeline call: denoising time, most cache bytes, the schedule as it ran
* :func:`summarize`       per-item records -> the totals ``taylorseer.runs.sampling_metrics`` takes
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from taylorseer import ForecastCache
from taylorseer.cache import CallSummary
from taylorseer.runs import read_json, synchronize


@dataclass(frozen=True)
class Item:
    """One output of a run: ``index``-th output of ``prompt``, sampled with ``seed``."""

    prompt: str
    index: int
    seed: int
    file: str


def plan_items(prompts: Iterable[str], per_prompt: int, seed: int, filename: Callable[[str, int], str]) -> list[Item]:
    """Every (prompt, index) of the run; output ``index`` of every prompt uses ``seed + index``.

    Repeated prompts are dropped (same prompt, same seeds: the same files), keeping the first.
    """
    unique = list(dict.fromkeys(prompts))
    return [Item(p, i, seed + i, filename(p, i)) for p in unique for i in range(per_prompt)]


def kept_records(out_dir: Path, items: list[Item]) -> dict[str, dict]:
    """Records (by file name) from an earlier ``metrics.json`` whose output files still exist."""
    wanted = {item.file for item in items}
    previous = read_json(Path(out_dir) / "metrics.json") or {}
    return {r["file"]: r for r in previous.get("items", [])
            if r.get("file") in wanted and (Path(out_dir) / r["file"]).is_file()}


@dataclass
class CallStats:
    denoise_seconds: float = float("nan")  # first transformer call -> end of the last step, device work included
    cache_bytes: int = 0  # most bytes the cache held during the call
    history: list = field(default_factory=list)  # the cache's StepRecords of the call

    def full_steps(self) -> dict[str, int]:
        """Computed steps per cache context (cond/uncond)."""
        return CallSummary(self.history, self.cache_bytes).full_steps()


class StepProbe:
    """Measures one diffusers pipeline call: denoising time through a transformer pre-hook and
    ``callback_on_step_end``; cache bytes and schedule from the cache's ``last_call`` (``end()``)."""

    def __init__(self, transformer, cache: ForecastCache | None, num_steps: int, device=None):
        self.cache, self.num_steps, self.device = cache, num_steps, device
        self.stats = CallStats()
        self._start: float | None = None
        self._handle = transformer.register_forward_pre_hook(self._on_call)

    def begin(self) -> None:
        self.stats, self._start = CallStats(), None

    def _on_call(self, _module, _args) -> None:
        if self._start is None:
            synchronize(self.device)
            self._start = time.perf_counter()

    def callback(self, _pipe, step: int, _timestep, _kwargs) -> dict:
        if step == self.num_steps - 1 and self._start is not None:
            synchronize(self.device)
            self.stats.denoise_seconds = time.perf_counter() - self._start
        return {}

    def end(self) -> None:
        """After the pipeline returned: the cache's record of the call (diffusers reset it at the end)."""
        if self.cache is not None:
            call = self.cache.end_call()
            self.stats.cache_bytes, self.stats.history = call.nbytes, call.history

    def remove(self) -> None:
        self._handle.remove()


def summarize(records: list[dict]) -> dict:
    """Totals over per-item records (``latency_s``, ``denoise_s``, ``cache_bytes``)."""
    n = len(records)
    return dict(
        seconds=sum(r["latency_s"] for r in records),
        denoise_seconds=sum(r.get("denoise_s", 0.0) for r in records),
        cache_bytes=max((r.get("cache_bytes", 0) for r in records), default=0),
        num_items=n,
    )
