"""Load a FLUX pipeline, attach the cache to its transformer, and sample with it.

The pipeline is diffusers' own, unmodified: ``FluxPipeline`` for FLUX.1-dev / FLUX.1-schnell (hub id or a
local folder in the same layout) and ``FluxKontextPipeline`` for FLUX.1-Kontext. The cache only touches
``pipe.transformer`` (see :mod:`taylorseer_flux.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import taylorseer
from taylorseer import CacheConfig, ForecastCache
from taylorseer.harness.diffusers_io import load_pipeline
from taylorseer.harness.runs import timed
from taylorseer.perf import peers

from .cache import attach_cache

PIPELINES = ("FluxPipeline", "FluxKontextPipeline")


def load_flux(source: str, *, pipeline: str = "FluxPipeline", dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", cpu_offload: bool = False, vae_tiling: bool = False,
              vae_slicing: bool = False):
    """``<pipeline>.from_pretrained(source)`` on ``device``, with diffusers' memory options.

    Raises :class:`taylorseer.harness.diffusers_io.WeightsNotFoundError` (what was looked for and how to get it)
    when the weights cannot be loaded.
    """
    import diffusers

    if pipeline not in PIPELINES:
        raise ValueError(f"model.pipeline={pipeline!r} is not supported: expected one of {list(PIPELINES)}")
    device = torch.device(device)
    if cpu_offload and device.type != "cuda":
        raise ValueError(f"cpu_offload=true moves models to and from a CUDA device, but device is {device}: "
                         "set device=cuda or cpu_offload=false")
    # Kontext and plain FLUX folders hold the same components: either loads as either pipeline.
    pipe = load_pipeline(getattr(diffusers, pipeline), source, accept=PIPELINES, dtype=dtype)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)  # the sampling script shows its own bar over the prompts
    return pipe


def flux_configs(source: str) -> tuple[dict, int]:
    """(the transformer's config, the VAE's downscaling factor) without loading any weights."""
    from pathlib import Path

    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from taylorseer.harness.diffusers_io import WeightsNotFoundError

    where = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    try:
        transformer = FluxTransformer2DModel.load_config(where, subfolder="transformer")
        vae = AutoencoderKL.load_config(where, subfolder="vae")
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError(f"cannot read the configs of {source}: {err}") from err
    config = {k: v for k, v in transformer.items() if not k.startswith("_")}
    return config, 2 ** (len(vae["block_out_channels"]) - 1)


@dataclass
class FluxCache:
    """The settings of the cache on one pipeline, so it can be detached (uncached baseline) and put back."""

    pipe: object
    config: CacheConfig
    num_steps: int
    forecast_text: bool = False
    impl: str = "taylorseer"  # or "diffusers": diffusers' own TaylorSeer hook, the peer baseline
    compile: bool = False  # taylorseer.compile the transformer's repeated blocks (after the cache, always)
    _diffusers_on: bool = False

    def attach(self) -> ForecastCache | None:
        transformer = self.pipe.transformer
        if taylorseer.get_cache(transformer) is not None or self._diffusers_on:
            return taylorseer.get_cache(transformer)
        taylorseer.uncompile(transformer)
        cache = None
        if self.config.enabled and self.impl == "diffusers":
            peers.enable(transformer, self.config)
            self._diffusers_on = True
        elif self.config.enabled:
            cache = attach_cache(transformer, self.config, self.num_steps, forecast_text=self.forecast_text)
        if self.compile:
            taylorseer.compile(transformer)
        return cache

    def detach(self) -> None:
        """The plain transformer (compiled too when ``compile``): the uncached baseline of the same run."""
        transformer = self.pipe.transformer
        taylorseer.uncompile(transformer)
        if self._diffusers_on:
            peers.disable(transformer)
            self._diffusers_on = False
        taylorseer.remove(transformer)
        if self.compile:
            taylorseer.compile(transformer)


@dataclass
class Generation:
    images: list
    seconds: float  # wall time of the pipeline call (device work included)
    cache_bytes: int = 0  # most bytes the cache held during the call
    full_steps: dict[str, int] = field(default_factory=dict)  # context -> computed steps
    history: list = field(default_factory=list)  # the cache's StepRecords of the call


def generate(pipe, prompts: list[str], seeds: list[int], *, num_steps: int, height: int | None = None,
             width: int | None = None, guidance_scale: float = 3.5, true_cfg_scale: float = 1.0,
             negative_prompt: str | None = None, max_sequence_length: int = 512, image=None,
             output_type: str = "pil", device=None, **pipeline_kwargs) -> Generation:
    """One pipeline call for a batch of prompts, image ``i`` from ``torch.Generator().manual_seed(seeds[i])``.

    The noise comes from CPU generators, one per image, so an image does not depend on the device, the
    batch it is in, or its place in the batch. The cache (if attached) is reset before the call; diffusers
    resets it again at the end of the call. ``image`` is FLUX Kontext's input image; its output size is
    ``height x width`` (Kontext's ``max_area``). Other keyword arguments go to the pipeline as they are.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cache = taylorseer.get_cache(pipe.transformer)
    if cache is not None:
        cache.reset(num_steps=num_steps)
        cache.last_call = None
    kwargs = dict(
        prompt=list(prompts),
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        max_sequence_length=max_sequence_length,
        output_type=output_type,
    )
    if height is not None:
        kwargs.update(height=height, width=width)
    if true_cfg_scale > 1:
        kwargs.update(true_cfg_scale=true_cfg_scale, negative_prompt=[negative_prompt or ""] * len(prompts))
    if image is not None:
        kwargs["image"] = [image] * len(prompts)
        if height is not None:
            kwargs["max_area"] = height * width  # Kontext scales its output to this area, keeping the aspect
    kwargs.update(pipeline_kwargs)
    timing: dict = {}
    with torch.inference_mode(), timed(timing, device=device):
        out = pipe(**kwargs)
    if cache is None:
        return Generation(list(out.images), timing["seconds"])
    call = cache.end_call()
    return Generation(list(out.images), timing["seconds"], call.nbytes, call.full_steps(), call.history)
