"""The videos of a run and what one pipeline call did.

* :func:`plan_items`      prompts x videos-per-prompt -> items with seed ``seed + index`` and file names
* :class:`StepProbe`      per pipeline call: denoising time, most cache bytes, the schedule as it ran

Resume and metrics live in the core (``taylorseer.harness.runfolder.Records``,
``taylorseer.harness.runs.sampling_metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from taylorseer import ForecastCache
from taylorseer.core.cache import CallSummary
from taylorseer.harness.runs import synchronize


@dataclass(frozen=True)
class Item:
    """One output of a run: ``index``-th output of ``prompt``, sampled with ``seed``."""

    prompt: str
    index: int
    seed: int
    file: str


def plan_items(prompts: Iterable[str], per_prompt: int, seed: int, names: dict[tuple[str, int], str]) -> list[Item]:
    """Every (prompt, index) of the run; output ``index`` of every prompt uses ``seed + index``.

    Repeated prompts are dropped (same prompt, same seeds: the same files), keeping the first. ``names``
    maps (prompt, index) to the output's file name (:func:`video_io.video_filenames`).
    """
    unique = list(dict.fromkeys(prompts))
    return [Item(p, i, seed + i, names[(p, i)]) for p in unique for i in range(per_prompt)]


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
