"""DiT + TaylorSeer: what to cache, how a batch of class labels becomes images, and its FLOPs.

Cached: the pre-gate outputs of ``blocks.i.attn`` and ``blocks.i.mlp`` (docs/dit.md). On a
forecast step each block runs a short forward instead of its own: the two gates (only their rows of
the adaLN matrix) and ``x + gate_msa * attn + gate_mlp * mlp`` with the forecasts folded in; the
block's own forward would also normalise and modulate the inputs of the two branches, for nothing.
With classifier-free guidance the conditional and unconditional halves run as one batch, so they
share one cache context, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import taylorseer
from taylorseer import CacheConfig, FlopsReport, ForecastCache
from taylorseer.core.schedule import warm_up_steps

from .checkpoints import LATENT_SCALE
from .diffusion import GaussianDiffusion, StepCallback, draw_noise
from .models import DiT

CACHED_MODULES = ("blocks.*.attn", "blocks.*.mlp")


def attach_cache(model: DiT, config: CacheConfig, num_steps: int) -> ForecastCache:
    """Put the forecasting cache on every block's attn and mlp (also when disabled: hooks stay inert).

    The core's ``dit`` preset: each block described as two gated branches, so a forecast step runs the
    two gates and the fused gated adds only.
    """
    return taylorseer.apply(model, config, preset="dit", num_steps=num_steps)


class _WarmedUp(Exception):
    pass


def warm_up(model: DiT, diffusion: GaussianDiffusion, cfg_scale: float, batch: int) -> None:
    """An untimed call (class 0, seed 0) with the run's sampler, cache and batch size: a process's first call
    pays one-off costs (allocator growth, kernel selection; on a CPU the fused forecast kernel of each
    arity is generated and compiled at its first use, and chosen by tensor size, hence the real batch).
    With the interval schedule it stops once every factor exists and forecast steps have used them all
    (warm-up + (O + 2) N steps); other schedules run the whole call. The cache is reset afterwards."""
    cache = taylorseer.get_cache(model)
    stop = diffusion.num_steps if cache is None else warm_up_steps(cache.config, diffusion.num_steps)

    def stop_early(step, _x):
        if step + 1 >= stop:
            raise _WarmedUp

    try:
        sample(model, diffusion, torch.zeros(batch, dtype=torch.long), cfg_scale, 0, callback=stop_early)
    except _WarmedUp:
        pass
    if cache is not None:
        cache.reset()


def initial_noise(model: DiT, n: int, generator, device) -> torch.Tensor:
    shape = (n, model.in_channels, model.input_size, model.input_size)
    return draw_noise(shape, generator, device, torch.float32)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``: its noise (and, for FID runs, its class)
    depend on nothing else, not the batch size, the world size or which rank made it."""
    return (int(seed) << 32) + int(index)


@torch.no_grad()
def sample(model: DiT, diffusion: GaussianDiffusion, labels: torch.Tensor, cfg_scale: float,
           seed: int | Sequence[int], progress: bool = False, callback: StepCallback | None = None,
           guidance_channels: int | None = None) -> torch.Tensor:
    """Latents (or pixels) for ``labels`` from the noise of ``seed``: (N, C, H, W).

    ``seed`` is one seed for the whole batch, or one per sample (then each sample's noise comes from its
    own generator, and a sample is the same whatever batch it is sampled in). The cache, if attached, is
    reset first, so repeated calls are independent. Noise is drawn on the CPU so the same seed gives the
    same samples on any device.
    """
    device = next(model.parameters()).device
    cache = taylorseer.get_cache(model)
    if cache is not None:
        cache.reset(num_steps=diffusion.num_steps)
    if isinstance(seed, int):
        generator = torch.Generator().manual_seed(seed)
    else:
        if len(seed) != len(labels):
            raise ValueError(f"{len(seed)} seeds for {len(labels)} labels: give one seed per sample (or one int)")
        generator = [torch.Generator().manual_seed(int(s)) for s in seed]
    z = initial_noise(model, len(labels), generator, device).to(next(model.parameters()).dtype)
    labels = labels.to(device)
    if cfg_scale > 1.0:
        z = torch.cat([z, z], dim=0)
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)], dim=0)

        def model_fn(x, t, y):
            return model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)
    else:
        model_fn = model
    out = diffusion.sample_loop(model_fn, z, dict(y=labels), generator=generator, progress=progress,
                                callback=callback)
    return out.chunk(2, dim=0)[0] if cfg_scale > 1.0 else out


@torch.no_grad()
def to_images(samples: torch.Tensor, vae=None) -> torch.Tensor:
    """Samples -> float images in [0, 1], (N, 3 or C, H, W); latents go through the VAE first."""
    if vae is not None:
        samples = vae.decode((samples / LATENT_SCALE).to(vae.dtype)).sample
    return ((samples.float() + 1) / 2).clamp(0, 1)


def count_flops(model: DiT, config: CacheConfig, num_steps: int, cfg_scale: float) -> FlopsReport:
    """FLOPs of one image's sampling run (batch of 1; doubled by CFG as the real run is)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = 2 if cfg_scale > 1.0 else 1
    x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size, device=device, dtype=dtype)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    cache = taylorseer.get_cache(model)
    with torch.no_grad():
        return taylorseer.count_schedule(lambda: model(x, t, y), cache if config.enabled else None, num_steps)


def meta_flops(config: CacheConfig, model: str = "DiT-XL/2", image_size: int = 256, num_steps: int = 50,
               cfg_scale: float = 1.5) -> FlopsReport:
    """FLOPs of one image's sampling run for a full-size DiT, counted on the meta device (no weights)."""
    from .checkpoints import build_model

    with torch.device("meta"):
        dit = build_model(model, image_size)
    attach_cache(dit, config, num_steps)
    try:
        return count_flops(dit, config, num_steps, cfg_scale)
    finally:
        taylorseer.remove(dit)
