"""Model families the benchmark knows: how to build a random model of a size, sample with it, attach this
project's cache, the ideal (every block skipped on forecast steps) and diffusers' own TaylorSeer hook.

A new family is one :class:`Family` passed to :func:`register` (the presets of other diffusers DiTs add
theirs this way): ``build(size, device, dtype)`` returns the model and ``sample(model, steps)``, a closure
that runs one sampling call of ``steps`` model calls from fixed noise and returns the final latent.
Sizes: ``smoke`` (tiny, a test), ``mid`` (the CPU benchmark), ``full`` (the real architecture, GPU).
Weights are random, with non-zero adaLN gates so every block does real work; inputs are fixed per seed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from taylorseer import CacheConfig

Sampler = Callable[[torch.nn.Module, int], torch.Tensor]


@dataclass
class Family:
    name: str
    interval: int  # the paper's N for this model
    first_enhance: int  # the paper's warm-up
    build: Callable[[str, torch.device, torch.dtype], tuple[torch.nn.Module, Sampler]]
    attach: Callable[[torch.nn.Module, CacheConfig, int], object]  # this project's cache
    attach_ideal: Callable[[torch.nn.Module, CacheConfig, int], object]  # blocks skipped on forecast steps
    diffusers_config: Callable[[], object] | None = None  # diffusers' TaylorSeerCacheConfig for this model
    describe: dict[str, str] = field(default_factory=dict)  # size -> what the model is, for the table

    def config(self, order: int) -> CacheConfig:
        return CacheConfig(interval=self.interval, max_order=order, first_enhance=self.first_enhance)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


@contextmanager
def building(device, dtype):
    """Create parameters on ``device`` in ``dtype`` directly: a full-size model never exists in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _gates_random(model: torch.nn.Module) -> None:
    """Random adaLN weights (diffusers and DiT zero some of them at init): every block really works."""
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and torch.count_nonzero(p) == 0:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


# ------------------------------------------------------------------------------------------------ DiT
def _preset_ideal(model, config, steps):
    from taylorseer.attach.families import apply_ideal

    return apply_ideal(model, config, steps)  # the preset's blocks skipped on forecast steps


def _diffusers_taylorseer(interval: int, warmup: int):
    def make():
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=warmup, max_order=1)

    return make


def _dit_build(size: str, device, dtype):
    from taylorseer_dit.diffusion import GaussianDiffusion
    from taylorseer_dit.models import DiT_models
    from taylorseer_dit.pipeline import sample

    name, latent, classes = {"smoke": ("DiT-Tiny/2", 8, 10), "mid": ("DiT-S/2", 32, 1000),
                             "full": ("DiT-XL/2", 32, 1000)}[size]
    torch.manual_seed(0)
    with building(device, torch.float32):  # DiT builds its fixed position embedding in float32
        model = DiT_models[name](input_size=latent, num_classes=classes).eval()
    model.initialize_weights(zero_init=False)
    model.to(dtype)
    labels = torch.tensor([1])

    def run(m, steps):
        return sample(m, GaussianDiffusion(steps, "ddim"), labels, 1.5, seed=0)  # one image, CFG: batch 2

    return model, run


def _dit_attach(model, config, steps):
    from taylorseer_dit.cache import attach_cache

    return attach_cache(model, config, steps)


register(Family("dit", 4, 2, _dit_build, _dit_attach, _preset_ideal, describe={
    "smoke": "DiT-Tiny/2, 8x8 latents", "mid": "DiT-S/2, 32x32 latents (256 tokens), 1 image + CFG",
    "full": "DiT-XL/2, 256x256 (32x32 latents), 1 image + CFG"}))


# ----------------------------------------------------------------------------------------------- FLUX
FLUX_SIZES = {
    "smoke": (dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), 64, 16),
    "mid": (dict(num_layers=4, num_single_layers=8, num_attention_heads=2, joint_attention_dim=512), 1024, 512),
    "full": ({}, 4096, 512),  # FLUX.1-dev at 1024x1024
}


def _euler(model, inputs: dict, steps: int, context: bool = True) -> torch.Tensor:
    """Flow-matching Euler as the FLUX/HunyuanVideo pipelines run it, one transformer call per step."""
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.inference_mode():
        for i in range(steps):
            t = (sigmas[i] * (1000.0 if "encoder_attention_mask" in inputs else 1.0)).expand(x.shape[0])
            with model.cache_context("cond"):
                v = model(**{**inputs, "hidden_states": x, "timestep": t.to(x.device, torch.float32)})[0]
            x = x + (sigmas[i + 1] - sigmas[i]).item() * v
        model._reset_stateful_cache()  # the end-of-call reset a diffusers pipeline does
    return x


def _flux_build(size: str, device, dtype):
    from diffusers import FluxTransformer2DModel

    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, transformer_inputs

    overrides, image_tokens, text_tokens = FLUX_SIZES[size]
    config = {**FLUX_DEV_TRANSFORMER, **overrides}
    torch.manual_seed(0)
    with building(device, dtype):
        model = FluxTransformer2DModel(**config).eval()
    inputs = transformer_inputs(config, image_tokens, text_tokens, device=device, dtype=dtype)
    return model, lambda m, steps: _euler(m, inputs, steps)


def _flux_attach(model, config, steps):
    from taylorseer_flux.cache import attach_cache

    return attach_cache(model, config, steps)


register(Family("flux", 6, 3, _flux_build, _flux_attach, _preset_ideal, _diffusers_taylorseer(6, 3), describe={
    "smoke": "FLUX architecture, 1 double + 2 single blocks, hidden 32, 64 + 16 tokens",
    "mid": "FLUX architecture, 4 double + 8 single blocks, hidden 256, 1024 image + 512 text tokens",
    "full": "FLUX.1-dev, 19 double + 38 single blocks, 1024x1024 (4096 + 512 tokens)"}))


# --------------------------------------------------------------------------------------- HunyuanVideo
HUNYUAN_SIZES = {
    "smoke": (dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                   num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32,
                   pooled_projection_dim=24, rope_axes_dim=(4, 6, 6)), (64, 64, 5), 16),
    "mid": (dict(num_attention_heads=2, num_layers=4, num_single_layers=8, num_refiner_layers=1,
                 text_embed_dim=256, pooled_projection_dim=256), (256, 256, 17), 128),  # 5 x 16 x 16 = 1280 tokens
    "full": ({}, (480, 640, 17), 256),  # 17 frames (5 latent frames, 6000 video tokens): the real model, shorter
}


def _hunyuan_build(size: str, device, dtype):
    from diffusers import HunyuanVideoTransformer3DModel

    from taylorseer_hunyuan_video.flops import HUNYUAN_VIDEO_CONFIG, VideoShape, dummy_inputs

    overrides, (height, width, frames), text = HUNYUAN_SIZES[size]
    torch.manual_seed(0)
    with building(device, dtype):
        model = HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO_CONFIG, **overrides}).eval()
    _gates_random(model)
    inputs = dummy_inputs(model, VideoShape(height, width, frames, text), device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[key] = torch.randn(inputs[key].shape, generator=g).to(device=device, dtype=dtype)
    return model, lambda m, steps: _euler(m, inputs, steps)


def _hunyuan_attach(model, config, steps):
    from taylorseer_hunyuan_video.cache import attach_cache

    return attach_cache(model, config, steps, single_attention=False)


register(Family("hunyuan_video", 5, 1, _hunyuan_build, _hunyuan_attach, _preset_ideal, _diffusers_taylorseer(5, 1),
                describe={"smoke": "HunyuanVideo architecture, 1 double + 2 single blocks, hidden 32",
                          "mid": "HunyuanVideo architecture, 4 double + 8 single blocks, hidden 256, "
                                 "1280 video + 128 text tokens",
                          "full": "HunyuanVideo, 20 double + 40 single blocks, 480x640x17 (6000 + 256 tokens)"}))


# ----------------------------------------------------- other diffusers DiTs: the presets' families (issue 13)
def _preset_family(name: str, interval: int, warmup: int, what: str, blocks: str = "4 blocks") -> Family:
    """A family of ``taylorseer.attach.families`` (Wan, SD3.5, PixArt-Sigma, CogVideoX, QwenImage, ...): its random
    mid-size model, its Euler loop, the preset (``ours``) and the preset's blocks skipped (``ideal``)."""
    from taylorseer.attach import families

    def build(size, device, dtype):
        case = families.bench_case(name, "smoke" if size == "smoke" else "mid", device, dtype)
        return case.model, lambda m, steps: families.sample(families.BenchCase(name, m, case.inputs), steps)

    def attach(model, config, steps):
        return families.apply_preset(model, config, steps)

    import diffusers

    has_hook = hasattr(getattr(diffusers, families.class_name(name)), "enable_cache")  # diffusers' CacheMixin
    return Family(name, interval, warmup, build, attach, _preset_ideal,
                  _diffusers_taylorseer(interval, warmup) if has_hook else None,
                  describe={"smoke": f"{what}, tiny", "mid": f"{what}, {blocks}, hidden 256, ~1024 tokens"})


# (name, N, warm-up, architecture, blocks at mid size). No paper gives N and a warm-up for the families after
# CogVideoX: they run at the N=5, warm-up 2 of SD3.5, PixArt and CogVideoX.
for _name, _n, _w, _what, *_blocks in (
        ("wan", 5, 1, "Wan 2.1 architecture"), ("sd3", 5, 2, "SD3.5 architecture"),
        ("pixart", 5, 2, "PixArt-Sigma architecture"), ("cogvideox", 5, 2, "CogVideoX architecture"),
        ("qwenimage", 5, 2, "QwenImage architecture"),
        ("flux2", 5, 2, "Flux2 architecture", "4 double + 8 single blocks"),
        ("ltx", 5, 2, "LTX-Video architecture"), ("hunyuan_video15", 5, 2, "HunyuanVideo 1.5 architecture"),
        ("sana", 5, 2, "Sana architecture"), ("lumina2", 5, 2, "Lumina2 architecture", "4 blocks + 2 refiners"),
        ("cogview4", 5, 2, "CogView4 architecture")):
    register(_preset_family(_name, _n, _w, _what, *_blocks))
