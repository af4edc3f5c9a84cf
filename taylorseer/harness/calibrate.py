"""Making a calibration file, and matching one to the run that wants to use it.

The file format, and what ``schedule: calibrated`` reads from it, is :mod:`taylorseer.core.calibration`.

A calibration measures one sampler on one model: its ``made_for`` record names the app, the weights'
fingerprint, the model, the sampler and its step spacing, the step count, the guidance and the resolution
(:func:`target`). A run with ``cache.schedule=calibrated`` states the same fields for itself and
:func:`calibration_identity` refuses a file made for anything else, in one line naming every difference,
unless ``accept_calibration_mismatch=true`` (then the run folder's identity records the differences).
Files written before ``made_for`` existed are matched from their ``settings`` (the app config they were
made with); their weights cannot be compared (they recorded a path, not a fingerprint).
"""

from __future__ import annotations

import fnmatch
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core.calibration import FORMAT
from ..core.calibration import load as load_calibration
from ..core.config import calibration_path
from . import runs
from .diffusers_io import content_fingerprint, weights_fingerprint
from .runfolder import file_fingerprint
from .settings import Setting

MATCHED = ("app", "model", "weights", "sampler", "spacing", "num_steps", "guidance", "resolution")


class CalibrationMismatchError(ValueError):
    """A calibration file was made for other settings than the run's; the message names the differences."""


def target(app: str, model: str, weights: str | None, sampler: str, spacing: str, num_steps: int, guidance: dict,
           resolution: str) -> dict:
    """What a calibration is made for (written into the file) or wanted for (a run's settings)."""
    return {"app": app, "model": model, "weights": weights, "sampler": sampler, "spacing": spacing,
            "num_steps": int(num_steps), "guidance": {k: float(v) for k, v in guidance.items()},
            "resolution": resolution}


def dit_target(cfg: dict, weights: str | None) -> dict:
    """The DiT apps' :func:`target` from their (plain) config."""
    size = cfg["model"]["image_size"]
    return target("dit", cfg["model"]["name"], weights, cfg["sampler"], cfg["spacing"], cfg["num_steps"],
                  {"cfg_scale": cfg["cfg_scale"]}, f"{size}x{size}")


def pipeline_target(app: str, cfg: dict, weights: str | None) -> dict:
    """The diffusers apps' (FLUX, HunyuanVideo) :func:`target`: the pipeline's own scheduler (its config is in
    the weights' fingerprint)."""
    size = f"{cfg['height']}x{cfg['width']}" + (f"x{cfg['num_frames']}" if "num_frames" in cfg else "")
    guidance = {"guidance_scale": cfg["guidance_scale"], "true_cfg_scale": cfg.get("true_cfg_scale", 1.0)}
    return target(app, cfg["model"]["name"], weights, "pipeline", "pipeline", cfg["num_steps"], guidance, size)


def recorded_target(meta: dict) -> dict:
    """What a loaded calibration file says it was made for: its ``made_for``, else (older files) what its
    ``settings`` (the app config it was made with) and step count say."""
    if isinstance(meta.get("made_for"), dict):
        return meta["made_for"]
    cfg = meta.get("settings") or {}
    app = cfg.get("app")
    try:
        if app == "dit":
            return dit_target({**cfg, "num_steps": meta.get("num_steps", cfg.get("num_steps"))}, None)
        if app in ("flux", "hunyuan_video"):
            return pipeline_target(app, {**cfg, "num_steps": meta.get("num_steps", cfg.get("num_steps"))}, None)
    except (KeyError, TypeError):
        pass
    return {"num_steps": meta.get("num_steps")}  # unknown origin: only the step count can be matched


def differences(have: dict, want: dict) -> list[str]:
    """``key: made for X, this run Y`` for every field both sides know and that differ."""
    out = []
    for key in MATCHED:
        a, b = have.get(key), want.get(key)
        if a is not None and b is not None and a != b:
            out.append(f"{key}: made for {_show(a)}, this run {_show(b)}")
    return out


def _show(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    return str(value)


def check_run(plain: dict, made_for: dict) -> dict:
    """:func:`calibration_identity` of a run's resolved settings (``plain``: its cache settings, and its
    ``accept_calibration_mismatch``) against what the run is (``made_for``)."""
    return calibration_identity(plain["cache"], made_for, bool(plain.get("accept_calibration_mismatch")))


def calibration_identity(cache: dict, want: dict, accept: bool = False) -> dict:
    """The identity entries of a run's calibration file (its content's fingerprint, and the accepted
    differences), after matching it to ``want`` (:func:`target` of the run). A file made for other settings
    raises :class:`CalibrationMismatchError` unless ``accept``. Nothing for a run that reads no calibration."""
    if not cache.get("enabled", True) or cache.get("schedule") != "calibrated" or not cache.get("calibration"):
        return {}
    path = calibration_path(cache["calibration"])
    have = recorded_target(load_calibration(path).meta)
    out = {"resolved.calibration": file_fingerprint(path)}
    diffs = differences(have, want)
    if diffs and not accept:
        raise CalibrationMismatchError(
            f"cache.calibration={cache['calibration']} was made for other settings ({'; '.join(diffs)}): make one for "
            f"these settings (bash scripts/calibrate.sh {want.get('app')} ...) or pass "
            f"accept_calibration_mismatch=true to use it anyway")
    if diffs:
        out["resolved.calibration_mismatch"] = "; ".join(diffs)
    return out


# A calibration command's own settings; the rest of its config is the sampling app's, checked by that app's schema.
SETTINGS = {"samples": Setting("int", minimum=1), "sketch_size": Setting("int", minimum=64),
            "epsilon": Setting("float", minimum=1e-6, maximum=1.0), "out": Setting("str", nullable=True)}


def pop_settings(plain: dict) -> dict:
    """Take the calibration's own settings out of a resolved config (checked, one line per bad value)."""
    extra = {key: plain.pop(key) for key in SETTINGS}
    for key, setting in SETTINGS.items():
        why = setting.problem(extra[key])
        if why:
            raise ValueError(f"{key}={extra[key]!r} is invalid: {why}")
    return extra


def check_samples(samples: int, num_steps: int) -> None:
    """A calibration's sample count must be a positive multiple of its sampling steps: sample ``i`` measures the
    sensitivity of step ``i mod num_steps``. The apps call this before loading a model, the Recorder again."""
    if samples < num_steps or samples % num_steps:
        raise ValueError(f"calibration samples={samples}: expected a multiple of the {num_steps} sampling steps "
                         f"(sample i measures the sensitivity of step i mod num_steps), e.g. samples={2 * num_steps}")


class Recorder:
    """Records the sketch trajectory, or perturbs one step per sample, on the named modules of a model.

    Args:
        model: the denoiser (uncached); each call is one sampling step (``calls_per_step`` calls with true CFG).
        modules: fnmatch patterns of the modules the cache forecasts (their outputs are what is sketched).
        num_steps: sampling steps per call of the sampler.
        samples: samples of the whole calibration (a multiple of ``num_steps``; sample i measures step
            ``i mod num_steps``). They may be sampled in several calls (``attached(mode, offset, batch)``).
        sketch_size: numbers kept per step in all, split over the modules' output tensors (>= 8 each).
        epsilon: relative size of the perturbation.
        timestep_fn: (args, kwargs) -> the call's timestep, recorded for ``step_distance: timestep``.
    """

    def __init__(self, model: torch.nn.Module, modules: Iterable[str], num_steps: int, samples: int,
                 sketch_size: int = 1024, epsilon: float = 0.05, seed: int = 0, calls_per_step: int = 1,
                 timestep_fn: Callable | None = None):
        check_samples(samples, num_steps)
        named = dict(model.named_modules())
        self.names = sorted({n for p in modules for n in named if n and fnmatch.fnmatchcase(n, p)})
        if not self.names:
            raise ValueError(f"no module matches {list(modules)}")
        self.model, self.modules = model, [named[n] for n in self.names]
        self.num_steps, self.samples, self.sketch_size = num_steps, samples, sketch_size
        self.epsilon, self.seed, self.calls_per_step = epsilon, seed, calls_per_step
        self.timestep_fn = timestep_fn
        self.calls, self.offset, self.batch = 0, 0, None
        self.mode = "record"
        self.rows: list[dict[str, torch.Tensor]] = [{} for _ in range(num_steps)]
        self.timesteps: list[float | None] = [None] * num_steps
        self._index: dict[str, torch.Tensor] = {}

    @property
    def step(self) -> int:
        return (self.calls // self.calls_per_step) % self.num_steps

    @contextmanager
    def attached(self, mode: str, offset: int = 0, batch: int | None = None) -> Iterator[None]:
        """``record`` (first run) or ``perturb`` (second run) while the block runs one sampling call of the
        samples ``offset .. offset + batch - 1``. Row r of a model input is sample ``offset + r mod batch``
        (a CFG batch holds each sample twice). The trajectory is recorded from the first call only."""
        self.mode, self.calls, self.offset, self.batch = mode, 0, offset, batch
        handles = [self.model.register_forward_pre_hook(self._count, with_kwargs=True)]
        handles += [m.register_forward_hook(self._hook(n)) for n, m in zip(self.names, self.modules, strict=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _count(self, _module, args, kwargs):
        step = self.step
        if self.mode == "record" and self.timestep_fn is not None:
            t = self.timestep_fn(args, kwargs)
            self.timesteps[step] = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t
        self._current = step  # the step every module hook of this call sees
        self.calls += 1

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            tensors = output if isinstance(output, tuple) else (output,)
            if self.mode == "record":
                for k, tensor in enumerate(tensors):
                    if isinstance(tensor, torch.Tensor):
                        self._record(f"{name}#{k}", tensor)
                return None
            out = tuple(self._perturb(f"{name}#{k}", t) if isinstance(t, torch.Tensor) else t
                        for k, t in enumerate(tensors))
            return out if isinstance(output, tuple) else out[0]

        return hook

    def _record(self, key: str, tensor: torch.Tensor) -> None:
        flat = tensor.detach().flatten()
        if key not in self._index:
            per_tensor = max(8, self.sketch_size // len(self.names))
            g = torch.Generator().manual_seed(self.seed + len(self._index))
            self._index[key] = torch.randperm(flat.numel(), generator=g)[:per_tensor].to(flat.device)
        row = self.rows[self._current]
        # Several calls per step (true CFG): the sketch keeps the conditional call's values.
        row.setdefault(key, flat[self._index[key]].double().cpu())

    def _perturb(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        batch = self.batch or tensor.shape[0]
        rows = [r for r in range(tensor.shape[0]) if (self.offset + r % batch) % self.num_steps == self._current]
        if not rows:
            return tensor
        salt = zlib.crc32(key.encode()) % 1000  # per module: a stable digest, not Python's salted hash()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._current * 1009 + salt)
        noise = torch.randn(tensor[rows].shape, generator=g, dtype=torch.float32).to(tensor.device, tensor.dtype)
        scale = self.epsilon * tensor.float().pow(2).mean().sqrt().to(tensor.dtype)
        out = tensor.clone()
        out[rows] = out[rows] + scale * noise
        return out

    def trajectory(self) -> torch.Tensor:
        """(num_steps, sketch) with each tensor's columns divided by their RMS over the run."""
        keys = sorted(self.rows[0])
        missing = [s for s in range(self.num_steps) if sorted(self.rows[s]) != keys]
        if missing:
            raise RuntimeError(f"the calibration run did not record every module at steps {missing[:5]}: was the "
                               f"sampling call {self.num_steps} steps long?")
        columns = []
        for key in keys:
            block = torch.stack([self.rows[s][key] for s in range(self.num_steps)])
            columns.append(block / block.pow(2).mean().sqrt().clamp_min(1e-30))
        return torch.cat(columns, dim=1)

    def sensitivity(self, reference: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Per step: mean squared change of the final samples perturbed at that step, over epsilon^2 (raw: a few
        samples per step, so it varies from sample to sample; :func:`smooth` makes the curve the placement reads)."""
        change = (perturbed.double() - reference.double()).flatten(1).pow(2).mean(dim=1)
        per_step = torch.zeros(self.num_steps, dtype=torch.float64)
        count = torch.zeros(self.num_steps, dtype=torch.float64)
        for i, value in enumerate(change):
            per_step[i % self.num_steps] += value
            count[i % self.num_steps] += 1
        return per_step / count.clamp_min(1) / self.epsilon**2


def smooth(values: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """The sensitivity curve the placement reads: a cubic in the step fraction fitted to log(raw) by least squares.

    Each raw value comes from samples/num_steps samples whose own sensitivities differ up to 10x (digit to
    digit; measured), while the true curve changes slowly from step to step (with 20 samples per step it is
    smooth and U-shaped, docs/schedules.md). Four parameters fitted to every sample keep that shape and
    average the sample noise away; a local window would keep too much of it.
    """
    n = len(values)
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    basis = torch.stack([x**k for k in range(degree + 1)], dim=1)
    logs = values.double().clamp_min(1e-30).log().unsqueeze(1)
    coefficients = torch.linalg.lstsq(basis, logs).solution
    return (basis @ coefficients).squeeze(1).exp()


def sensitivity_curve(raw: torch.Tensor) -> torch.Tensor:
    """What the placement reads: :func:`smooth` over every step but the last, and the last step's own mean.

    The last step maps straight to the output, so its weight is set by the sampler's final coefficient
    and jumps away from the trend of the others: DDIM's last eps is scaled by sqrt(1 - abar_0) = 0.01
    (measured on the digits DiT: 0.75x the mean where the trend says 6x), Euler's last velocity by the
    last sigma (the digits FLUX model: 4.9x where the trend says 1.6x). A smooth curve through it would
    get it wrong either way."""
    return torch.cat([smooth(raw[:-1]), raw[-1:].double()]) if len(raw) > 4 else smooth(raw)


def app_settings(plain: dict) -> dict:
    """An app's resolved settings as a calibration file records them: all but the cache's and Hydra's own."""
    return {k: v for k, v in plain.items() if k not in ("cache", "hydra")}


def pipeline_made_for(app: str, settings_used: dict, model_path: str) -> dict:
    """:func:`pipeline_target` with the weights' fingerprint (none for weights known only by a hub id: the id is in
    the target's model name already)."""
    return pipeline_target(app, settings_used, content_fingerprint(weights_fingerprint(model_path)))


def write_and_report(tag: str, path: str | Path, recorder: Recorder, reference: list[torch.Tensor],
                     perturbed: list[torch.Tensor], flops_per_sample: int, app: str, settings_used: dict,
                     made_for: dict, noun: str) -> dict:
    """What every app's calibration ends with: :func:`write` (the two runs' outputs, batch by batch; FLOPs of both
    uncached runs of all ``recorder.samples``) and one line saying what was written."""
    summary = write(path, recorder, torch.cat(reference), torch.cat(perturbed), flops_per_sample * recorder.samples,
                    {"app": app, **settings_used}, made_for)
    print(f"[{tag}] wrote {path}: {summary['modules']} modules, sketch {summary['sketch_size']}, "
          f"{summary['flops']['total'] / 1e12:.4f} TFLOPs (two uncached runs of {recorder.samples} {noun})")
    return summary


def write(path: str | Path, recorder: Recorder, reference: torch.Tensor, perturbed: torch.Tensor,
          flops_per_run: int | None, settings: dict, made_for: dict | None = None) -> dict:
    """Save the calibration file (atomically) and return its summary (without the trajectory).
    ``made_for`` is the :func:`target` the runs that use the file must match."""
    trajectory = recorder.trajectory()
    raw = recorder.sensitivity(reference, perturbed)
    sensitivity = sensitivity_curve(raw)
    timesteps = recorder.timesteps if all(t is not None for t in recorder.timesteps) else None
    summary = {
        "format": FORMAT,
        "num_steps": recorder.num_steps,
        "samples": recorder.samples,
        "sketch_size": int(trajectory.shape[1]),
        "modules": len(recorder.names),
        "epsilon": recorder.epsilon,
        "flops": {"per_run": flops_per_run, "runs": 2,
                  "total": None if flops_per_run is None else 2 * int(flops_per_run),
                  "convention": "torch FlopCounterMode, 2 FLOPs per multiply-add; both uncached runs of all samples"},
        "settings": settings,
    }
    if made_for is not None:
        summary["made_for"] = made_for
    data = dict(summary, timesteps=timesteps, sensitivity=[float(f"{v:.6g}") for v in sensitivity.tolist()],
                sensitivity_raw=[float(f"{v:.6g}") for v in raw.tolist()],
                trajectory=[[float(f"{v:.5g}") for v in row] for row in trajectory.tolist()])
    runs.write_text(path, json.dumps(data, separators=(",", ":")) + "\n")
    return summary
