"""A calibration file: what ``schedule: calibrated`` places its K computed steps from.

Made from two uncached sampling runs of the same B samples (B a multiple of the number of steps n):

1. **Trajectory.** Hooks on the cached modules keep, at every step, a fixed random subset of each module's
   output coordinates (a sketch; ``sketch_size`` numbers in all, split over the modules' output tensors),
   each tensor's sketch divided by its RMS over the run so that every module counts alike. Forecasters are
   linear in the features, so forecasting the sketch gives the sketch of the forecast
   (:mod:`taylorseer.core.placement` relies on this).
2. **Sensitivity.** The same samples again, sample i with every cached module's output perturbed at step
   ``i mod n`` only, by ``epsilon`` times the output's RMS times Gaussian noise. The squared change of each
   final sample, over epsilon^2, measures how much a relative feature error at that step reaches the
   output: ``w_s = mean_{i mod n = s} ||x_i' - x_i||^2 / epsilon^2`` (one run measures every step, one
   sample per step per n samples). Its cost: B more sampling calls, counted with the first run's. The raw
   values are noisy; the file keeps them and the curve the placement reads (:func:`sensitivity_curve`).

Both runs are counted in FLOPs (``flops`` in the file: the two uncached runs' total) and the apps report it
beside the FLOPs of every calibrated run. The file is JSON: the settings it was made with, the per-step
timesteps, ``sensitivity`` and ``trajectory`` (n rows of ``sketch_size`` numbers, 5 significant digits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import calibration_path

FORMAT = "taylorseer.calibration/1"


@dataclass
class Calibration:
    """A loaded calibration file."""

    num_steps: int
    trajectory: torch.Tensor  # (num_steps, sketch) float64
    sensitivity: torch.Tensor  # (num_steps,) float64, >= 0
    timesteps: list[float] | None = None
    meta: dict = field(default_factory=dict)

    def positions(self, step_distance: str) -> list[float]:
        """The forecaster's axis, as the cache builds it: step indices, or the model's timesteps."""
        if step_distance == "index":
            return [float(s) for s in range(self.num_steps)]
        if not self.timesteps:
            raise ValueError("cache.step_distance=timestep but the calibration recorded no timesteps: calibrate again")
        return [float(t) for t in self.timesteps]


def load(path: str | Path) -> Calibration:
    """Read a calibration file; a file of another kind fails with what it is."""
    path = calibration_path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cache.calibration={str(path)!r} cannot be read as a calibration file: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"cache.calibration={str(path)!r} is not a calibration file (format "
                         f"{data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT!r})")
    trajectory = torch.tensor(data["trajectory"], dtype=torch.float64)
    sensitivity = torch.tensor(data["sensitivity"], dtype=torch.float64)
    meta = {k: v for k, v in data.items() if k not in ("trajectory", "sensitivity", "sensitivity_raw", "timesteps")}
    return Calibration(int(data["num_steps"]), trajectory, sensitivity, data.get("timesteps"), meta)


def flops_of(path: str | Path | None) -> int | None:
    """FLOPs the calibration file's runs cost (None without a file)."""
    if not path:
        return None
    return int(load(path).meta.get("flops", {}).get("total", 0)) or None
