"""Load diffusers' ``HunyuanVideoPipeline`` (unmodified), put the cache on its transformer, sample one video.

The real model is ``hunyuanvideo-community/HunyuanVideo`` (diffusers layout) or a local folder in that
layout; the tests load a tiny random pipeline saved the same way through the same :func:`load_hunyuan_video`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

import taylorseer
from taylorseer import CacheConfig, ForecastCache
from taylorseer.harness.diffusers_io import WeightsNotFoundError, load_pipeline
from taylorseer.harness.runs import timed
from taylorseer.perf import peers

from .cache import attach_cache
from .runner import CallStats, StepProbe

HUB_ID = "hunyuanvideo-community/HunyuanVideo"


def load_hunyuan_video(source: str = HUB_ID, *, dtype: torch.dtype = torch.bfloat16, flow_shift: float = 7.0,
                       vae_tiling: bool = False) -> HunyuanVideoPipeline:
    """``HunyuanVideoPipeline.from_pretrained(source)`` on the CPU, with the flow shift set.

    Raises :class:`taylorseer.harness.diffusers_io.WeightsNotFoundError` (where it looked, how to get the
    weights) when it cannot load. Call :func:`place` after attaching the cache.
    """
    try:
        pipe = load_pipeline(HunyuanVideoPipeline, source, dtype=dtype)
    except WeightsNotFoundError as err:
        raise WeightsNotFoundError(f"{err} HunyuanVideo in the diffusers layout is `huggingface-cli download {HUB_ID} "
                                   f"--local-dir DIR`, then model.path=DIR.") from err
    # The shift of the flow-matching sigmas (upstream: 7.0 for 480p/720p text-to-video).
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=float(flow_shift))
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


def transformer_config(source: str = HUB_ID) -> dict:
    """The transformer's ``config.json`` alone (no weights): enough to count FLOPs on the meta device."""
    from diffusers import HunyuanVideoTransformer3DModel

    path = Path(source).expanduser()
    try:
        config = HunyuanVideoTransformer3DModel.load_config(str(path) if path.is_dir() else source,
                                                            subfolder="transformer")
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError(f"cannot read the transformer config of {source}: {err}") from err
    return {k: v for k, v in config.items() if not k.startswith("_")}


def place(pipe: HunyuanVideoPipeline, device: torch.device, cpu_offload: bool = False) -> None:
    """Move the pipeline to ``device``, or let diffusers offload whole models to the CPU between uses.

    Offloading is diffusers' ``enable_model_cpu_offload`` (one model on the GPU at a time). Call it
    after :func:`enable_cache`: accelerate then wraps the cache's hooks, and its per-call re-wrapping
    restores them. Sequential (per-layer) offload is not offered: it rewrites every submodule's forward.
    """
    device = torch.device(device)
    if cpu_offload:
        if device.type != "cuda":
            raise ValueError(f"cpu_offload=true moves models between the CPU and a CUDA device, but device is "
                             f"{device}: set device=cuda (or auto on a GPU node) or cpu_offload=false")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def enable_cache(pipe: HunyuanVideoPipeline, config: CacheConfig, num_steps: int,
                 single_attention: bool = True, impl: str = "taylorseer") -> ForecastCache | None:
    """The forecasting cache on ``pipe.transformer`` (None when the cache is disabled: pure diffusers, or when
    ``impl="diffusers"`` puts diffusers' own TaylorSeer hook there instead, the peer baseline)."""
    if not config.enabled:
        return None
    if impl == "diffusers":
        peers.enable(pipe.transformer, config)
        return None
    return attach_cache(pipe.transformer, config, num_steps, single_attention)


@dataclass
class Video:
    frames: np.ndarray | torch.Tensor  # (F, H, W, 3) floats in [0, 1]; latents for output_type="latent"
    seconds: float  # wall time of the whole pipeline call (text encoders, denoising, VAE decode)
    stats: CallStats  # denoising time, cache bytes, schedule

    @property
    def denoise_seconds(self) -> float:
        return self.stats.denoise_seconds


def generate(pipe: HunyuanVideoPipeline, prompt: str, seed: int, *, num_steps: int = 50, height: int = 480,
             width: int = 640, num_frames: int = 65, guidance_scale: float = 6.0, true_cfg_scale: float = 1.0,
             negative_prompt: str | None = None, max_sequence_length: int = 256, output_type: str = "np",
             probe: StepProbe | None = None, device=None) -> Video:
    """One video of ``prompt``; the noise comes from ``torch.Generator("cpu").manual_seed(seed)``.

    A CPU generator makes the video independent of the device. The cache (if attached) is reset
    before the call; diffusers resets it again when the call returns.
    """
    cache = taylorseer.get_cache(pipe.transformer)
    if cache is not None:
        cache.reset(num_steps=num_steps)
        cache.last_call = None
    own_probe = probe is None
    probe = probe or StepProbe(pipe.transformer, cache, num_steps, device)
    probe.begin()
    kwargs = dict(prompt=prompt, height=height, width=width, num_frames=num_frames, num_inference_steps=num_steps,
                  guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                  generator=torch.Generator("cpu").manual_seed(int(seed)), output_type=output_type,
                  callback_on_step_end=probe.callback)
    if true_cfg_scale > 1:
        # diffusers only runs true CFG when a negative prompt is given; "" is the usual unconditional prompt.
        kwargs.update(true_cfg_scale=true_cfg_scale, negative_prompt=negative_prompt or "")
    timing: dict = {}
    try:
        with torch.inference_mode(), timed(timing, device=device):
            out = pipe(**kwargs)
        probe.end()
    finally:
        if own_probe:
            probe.remove()
    frames = out.frames[0]
    return Video(frames, timing["seconds"], probe.stats)
