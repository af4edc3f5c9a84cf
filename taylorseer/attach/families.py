"""Random transformers of each diffusers family and their inputs: for the benchmark, discovery and FLOPs.

    case = families.bench_case("wan", size="mid")      # a random WanTransformer3DModel and one step's inputs
    out = case.model(**case.inputs)                      # one denoiser call
    families.apply_ideal(case.model, config, 50)         # the bound: every block skipped on forecast steps

Sizes: ``"mid"`` is the benchmark model of issue 13 (4 blocks, hidden 256 = 2 heads x 128, about 1024
image/video tokens and a few hundred text tokens, random weights: what the CPU speedups in docs/any_model.md
are measured on); ``"smoke"`` is tiny (2 blocks, hidden 32) for tests. ``inputs(name, model)`` builds a call
of any size for a model of the family, as its diffusers pipeline makes it (random values, or shapes only on the
``meta`` device, except for the families whose forward reads values: :func:`count_device`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.config import CacheConfig
from ..perf.flops import count_flops
from ..perf.opcount import count_ops
from . import presets
from .hooks import apply, remove

# (transformer class, config per size, spatial size per size, text tokens per size)
_WAN = {
    "mid": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=1024),
    "smoke": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                  text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
}
_SD3 = {
    "mid": dict(sample_size=64, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=128,
                num_attention_heads=2, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256,
                out_channels=16, pos_embed_max_size=64, dual_attention_layers=(0, 1)),
    "smoke": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                  out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,)),
}
_PIXART = {
    "mid": dict(sample_size=64, num_layers=4, patch_size=2, attention_head_dim=128, num_attention_heads=2,
                caption_channels=256, in_channels=4, cross_attention_dim=256, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False),
    "smoke": dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=2,
                  caption_channels=32, in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True,
                  activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                  norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False),
}
_COGVIDEOX = {
    "mid": dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, time_embed_dim=256,
                text_embed_dim=256, num_layers=4, sample_width=32, sample_height=32, sample_frames=13, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=226),
    "smoke": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                  text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=16),
}
_FLUX = {
    "mid": dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                num_attention_heads=2, joint_attention_dim=512, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56)),
    "smoke": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6)),
}
_HUNYUAN = {
    "mid": dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=128, num_layers=4,
                num_single_layers=8, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                guidance_embeds=True, text_embed_dim=256, pooled_projection_dim=256, rope_axes_dim=(16, 56, 56)),
    "smoke": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                  guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(4, 6, 6)),
}

_QWENIMAGE = {  # latents packed 2x2 (in_channels = 4 x 16)
    "mid": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=128,
                num_attention_heads=2, joint_attention_dim=256, axes_dims_rope=(16, 56, 56)),
    "smoke": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
}
_FLUX2 = {  # FLUX's 4 double + 8 single blocks; four rotary axes (time, height, width, layer)
    "mid": dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                num_attention_heads=2, joint_attention_dim=512, timestep_guidance_channels=256,
                axes_dims_rope=(32, 32, 32, 32)),
    "smoke": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                  axes_dims_rope=(4, 4, 4, 4)),
}
_LTX = {  # patch 1: its VAE compresses 32x spatially and 8x in time, into 128 channels
    "mid": dict(in_channels=128, out_channels=128, num_attention_heads=2, attention_head_dim=128,
                cross_attention_dim=256, num_layers=4, caption_channels=256),
    "smoke": dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                  num_layers=2, caption_channels=32),
}
_HUNYUAN15 = {  # in_channels = 2 x latent channels + 1: the latents, the condition latents and their mask
    "mid": dict(in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=128, num_layers=4,
                num_refiner_layers=1, mlp_ratio=4.0, text_embed_dim=256, text_embed_2_dim=256, image_embed_dim=256,
                rope_axes_dim=(16, 56, 56), task_type="t2v"),
    "smoke": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=24, image_embed_dim=16,
                  rope_axes_dim=(4, 6, 6), task_type="t2v"),
}
_SANA = {  # patch 1: its VAE compresses 32x
    "mid": dict(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=128, num_layers=4,
                num_cross_attention_heads=2, cross_attention_head_dim=128, cross_attention_dim=256,
                caption_channels=256, sample_size=32),
    "smoke": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                  caption_channels=32, sample_size=8),
}
_LUMINA2 = {  # axes_lens: rotary positions per axis (text tokens, latent rows / 2, latent columns / 2)
    "mid": dict(sample_size=64, patch_size=2, in_channels=16, hidden_size=256, num_layers=4, num_refiner_layers=1,
                num_attention_heads=2, num_kv_heads=1, axes_dim_rope=(32, 48, 48), cap_feat_dim=256),
    "smoke": dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                  num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
                  axes_lens=(160, 32, 32), cap_feat_dim=32),
}
_COGVIEW4 = {
    "mid": dict(patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=128,
                num_attention_heads=2, text_embed_dim=256, time_embed_dim=256, condition_dim=64, sample_size=64),
    "smoke": dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                  num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16,
                  sample_size=8, rope_axes_dim=(16, 16)),
}

# Tokens of one call at each size: (latent frames, latent height, latent width, text tokens).
_SHAPES = {
    "wan": {"mid": (4, 32, 32, 256), "smoke": (2, 4, 4, 8)},  # 4 x 16 x 16 = 1024 video tokens
    "sd3": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},  # 32 x 32 = 1024 image tokens
    "pixart": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},
    "cogvideox": {"mid": (4, 32, 32, 226), "smoke": (2, 4, 4, 16)},  # text = max_text_seq_length
    "flux": {"mid": (1, 64, 64, 512), "smoke": (1, 16, 16, 16)},  # packed 2x2: 1024 image tokens
    "hunyuan_video": {"mid": (4, 32, 32, 256), "smoke": (2, 4, 4, 8)},
    "qwenimage": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},  # packed 2x2: 1024 image tokens
    "flux2": {"mid": (1, 64, 64, 512), "smoke": (1, 8, 8, 8)},  # packed 2x2
    "ltx": {"mid": (4, 16, 16, 256), "smoke": (2, 4, 4, 8)},  # patch 1: 4 x 16 x 16 = 1024 video tokens
    "hunyuan_video15": {"mid": (4, 16, 16, 256), "smoke": (2, 4, 4, 8)},  # patch 1
    "sana": {"mid": (1, 32, 32, 256), "smoke": (1, 8, 8, 8)},  # patch 1: 1024 image tokens
    "lumina2": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},
    "cogview4": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},
}
_CONFIGS = {"wan": _WAN, "sd3": _SD3, "pixart": _PIXART, "cogvideox": _COGVIDEOX, "flux": _FLUX,
            "hunyuan_video": _HUNYUAN, "qwenimage": _QWENIMAGE, "flux2": _FLUX2, "ltx": _LTX,
            "hunyuan_video15": _HUNYUAN15, "sana": _SANA, "lumina2": _LUMINA2, "cogview4": _COGVIEW4}
# The one registry of families is the presets' (name -> transformer classes, description); this module adds the
# benchmark sizes of the diffusers families.
NAMES = tuple(_CONFIGS)


def class_name(name: str) -> str:
    """The diffusers class of family ``name`` (from its preset)."""
    return presets.get(name).classes[0]


@dataclass
class BenchCase:
    """A random transformer of one family and the keyword arguments of one denoiser call."""

    family: str
    model: torch.nn.Module
    inputs: dict

    def __call__(self, **changes):
        return self.model(**{**self.inputs, **changes})


def config_of(name: str, size: str = "mid") -> dict:
    if name not in _CONFIGS:
        raise ValueError(f"unknown family {name!r}; families: {list(_CONFIGS)}")
    if size not in _CONFIGS[name]:
        raise ValueError(f"unknown size {size!r}; sizes: {list(_CONFIGS[name])}")
    return dict(_CONFIGS[name][size])


def build(name: str, size: str = "mid", device="cpu", dtype=torch.float32, seed: int = 0) -> torch.nn.Module:
    """A random transformer of family ``name`` (eval mode). On ``meta`` it holds shapes only."""
    import diffusers

    cls = getattr(diffusers, class_name(name))
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config_of(name, size)).eval()
    return model if dtype == torch.float32 or torch.device(device).type == "meta" else model.to(dtype)


def bench_case(name: str, size: str = "mid", device="cpu", dtype=torch.float32, seed: int = 0,
               batch: int = 1) -> BenchCase:
    """A random transformer of family ``name`` and one call's inputs at the benchmark (or smoke) size."""
    model = build(name, size, device, dtype, seed)
    frames, height, width, text = _SHAPES[name][size]
    return BenchCase(name, model, inputs(name, model, batch=batch, frames=frames, height=height, width=width,
                                         text_tokens=text, seed=seed + 1))


@dataclass(frozen=True)
class _Loop:
    """How a family's pipeline calls its transformer in the denoising loop."""

    channel_dim: int = 1  # the latents' channels in hidden_states (2: packed tokens)
    timestep: Callable[[float], float] = lambda sigma: 1000.0 * sigma  # what it passes at noise level sigma (1 -> 0)
    integer: bool = False  # CogVideoX passes integer timesteps
    sign: float = 1.0  # Lumina2's pipeline negates the model's output (its time runs 0 -> 1, noise to image)


_PACKED, _PACKED_PER_1 = _Loop(channel_dim=2), _Loop(channel_dim=2, timestep=lambda sigma: sigma)
_LOOPS = {"cogvideox": _Loop(channel_dim=2, integer=True), "flux": _PACKED_PER_1, "qwenimage": _PACKED_PER_1,
          "flux2": _PACKED_PER_1, "ltx": _PACKED, "lumina2": _Loop(timestep=lambda sigma: 1.0 - sigma, sign=-1.0)}
# Families whose forward reads input values to size tensors (token counts from masks, a text-to-video check on the
# image embeddings): they run on real tensors only, never on the meta device.
_NEEDS_VALUES = {"hunyuan_video15", "lumina2"}


def loop_of(name: str) -> _Loop:
    return _LOOPS.get(name, _Loop())


def count_device(name: str) -> str:
    """Where family ``name``'s model can run for a count: ``meta`` (shapes only), or ``cpu`` where it needs values."""
    return "cpu" if name in _NEEDS_VALUES else "meta"


@dataclass(frozen=True)
class _Call:
    """One denoiser call being built: the model, the latent size, and tensors on the model's device."""

    model: torch.nn.Module
    batch: int
    frames: int
    height: int
    width: int
    text: int
    t: torch.Tensor  # the timestep as the family's pipeline passes it
    rand: Callable[..., torch.Tensor]

    @property
    def c(self):
        return self.model.config

    def full(self, *shape, value: float = 1.0, dtype=None) -> torch.Tensor:
        param = next(self.model.parameters())
        return torch.full(shape, value, device=param.device, dtype=dtype or param.dtype)

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(next(self.model.parameters()).device)

    def text_states(self, width: int) -> torch.Tensor:
        return self.rand(self.batch, self.text, width)


def _wan(k: _Call) -> dict:
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.frames, k.height, k.width), timestep=k.t,
                encoder_hidden_states=k.text_states(k.c.text_dim))


def _sd3(k: _Call) -> dict:
    largest = k.c.pos_embed_max_size * k.c.patch_size  # its position embedding is cropped, never extended
    height, width = min(k.height, largest), min(k.width, largest)
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, height, width), timestep=k.t,
                encoder_hidden_states=k.text_states(k.c.joint_attention_dim),
                pooled_projections=k.rand(k.batch, k.c.pooled_projection_dim))


def _pixart(k: _Call) -> dict:
    extra = {"resolution": None, "aspect_ratio": None}
    if k.model.use_additional_conditions:  # PixArt-Alpha 1024: the image size and aspect ratio are embedded
        extra = {"resolution": k.full(k.batch, 2, value=8.0 * k.height),
                 "aspect_ratio": k.full(k.batch, 1, value=k.width / k.height)}
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.height, k.width), timestep=k.t,
                encoder_hidden_states=k.text_states(k.c.caption_channels), added_cond_kwargs=extra)


def _cogvideox(k: _Call) -> dict:
    text = k.c.max_text_seq_length  # its positional embedding covers exactly this many (pipelines pad)
    return dict(hidden_states=k.rand(k.batch, k.frames, k.c.in_channels, k.height, k.width), timestep=k.t,
                encoder_hidden_states=k.rand(k.batch, text, k.c.text_embed_dim))


def _flux(k: _Call) -> dict:
    tokens = (k.height // 2) * (k.width // 2)
    out = dict(hidden_states=k.rand(k.batch, tokens, k.c.in_channels), timestep=k.t,
               encoder_hidden_states=k.text_states(k.c.joint_attention_dim),
               pooled_projections=k.rand(k.batch, k.c.pooled_projection_dim), img_ids=k.rand(tokens, 3),
               txt_ids=k.full(k.text, 3, value=0.0))
    if k.c.guidance_embeds:
        out["guidance"] = k.full(k.batch, value=3.5)
    return out


def _hunyuan_video(k: _Call) -> dict:
    out = dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.frames, k.height, k.width), timestep=k.t,
               encoder_hidden_states=k.text_states(k.c.text_embed_dim),
               encoder_attention_mask=k.full(k.batch, k.text),
               pooled_projections=k.rand(k.batch, k.c.pooled_projection_dim))
    if k.c.guidance_embeds:
        out["guidance"] = k.full(k.batch, value=6000.0)
    return out


def _qwenimage(k: _Call) -> dict:
    rows, cols = k.height // 2, k.width // 2  # latents packed 2x2, as the pipeline does
    return dict(hidden_states=k.rand(k.batch, rows * cols, k.c.in_channels),
                encoder_hidden_states=k.text_states(k.c.joint_attention_dim),
                encoder_hidden_states_mask=k.full(k.batch, k.text), timestep=k.t,
                img_shapes=[[(1, rows, cols)]] * k.batch)


def _flux2(k: _Call) -> dict:
    rows, cols = k.height // 2, k.width // 2  # latents packed 2x2
    one = torch.arange(1)  # positions (time, row, column, layer), as the pipeline's _prepare_*_ids
    img_ids = torch.cartesian_prod(one, torch.arange(rows), torch.arange(cols), one)
    txt_ids = torch.cartesian_prod(one, one, one, torch.arange(k.text))
    out = dict(hidden_states=k.rand(k.batch, rows * cols, k.c.in_channels),
               encoder_hidden_states=k.text_states(k.c.joint_attention_dim), timestep=k.t,
               img_ids=k.on_device(img_ids.expand(k.batch, -1, -1)),
               txt_ids=k.on_device(txt_ids.expand(k.batch, -1, -1)))
    if k.c.guidance_embeds:
        out["guidance"] = k.full(k.batch, value=4.0)
    return out


def _ltx(k: _Call) -> dict:
    frames, rows, cols = k.frames // k.c.patch_size_t, k.height // k.c.patch_size, k.width // k.c.patch_size
    return dict(hidden_states=k.rand(k.batch, frames * rows * cols, k.c.in_channels),
                encoder_hidden_states=k.text_states(k.c.caption_channels), timestep=k.t,
                encoder_attention_mask=k.full(k.batch, k.text), num_frames=frames, height=rows, width=cols)


def _hunyuan_video15(k: _Call) -> dict:
    """Text to video: the condition latents and their mask are zeros, and so are the image embeddings (which the model
    reads as "no image"). The byT5 stream (glyph text) gets a sixteenth of the tokens: its projection has a fixed
    width of 2048, which at the mid size would cost more per token than a block."""
    latents, video = k.c.out_channels, (k.frames, k.height, k.width)
    condition = k.full(k.batch, k.c.in_channels - latents, *video, value=0.0)
    byt5, image = max(k.text // 16, 1), max(k.text // 32, 1)
    return dict(hidden_states=torch.cat([k.rand(k.batch, latents, *video), condition], dim=1), timestep=k.t,
                encoder_hidden_states=k.text_states(k.c.text_embed_dim),
                encoder_attention_mask=k.full(k.batch, k.text),
                encoder_hidden_states_2=k.rand(k.batch, byt5, k.c.text_embed_2_dim),
                encoder_attention_mask_2=k.full(k.batch, byt5),
                image_embeds=k.full(k.batch, image, k.c.image_embed_dim, value=0.0))


def _sana(k: _Call) -> dict:
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.height, k.width),
                encoder_hidden_states=k.text_states(k.c.caption_channels), timestep=k.t,
                encoder_attention_mask=k.full(k.batch, k.text))


def _lumina2(k: _Call) -> dict:
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.height, k.width), timestep=k.t,
                encoder_hidden_states=k.text_states(k.c.cap_feat_dim),
                encoder_attention_mask=k.full(k.batch, k.text, dtype=torch.bool))


def _cogview4(k: _Call) -> dict:
    pixels = k.full(k.batch, 2, value=8.0 * k.height)  # original and target size in pixels (VAE factor 8)
    return dict(hidden_states=k.rand(k.batch, k.c.in_channels, k.height, k.width),
                encoder_hidden_states=k.text_states(k.c.text_embed_dim), timestep=k.t, original_size=pixels,
                target_size=pixels, crop_coords=k.full(k.batch, 2, value=0.0))


# family -> one call's keyword arguments (return_dict=False added), from the pipeline's own call
_INPUTS: dict[str, Callable[[_Call], dict]] = {
    "wan": _wan, "sd3": _sd3, "pixart": _pixart, "cogvideox": _cogvideox, "flux": _flux,
    "hunyuan_video": _hunyuan_video, "qwenimage": _qwenimage, "flux2": _flux2, "ltx": _ltx,
    "hunyuan_video15": _hunyuan_video15, "sana": _sana, "lumina2": _lumina2, "cogview4": _cogview4}


def inputs(name: str, model: torch.nn.Module, *, batch: int = 1, frames: int = 1, height: int = 64,
           width: int = 64, text_tokens: int = 128, seed: int = 1, timestep: float = 500.0) -> dict:
    """Keyword arguments of one denoiser call for ``model`` (family ``name``) at the given latent size.

    Values are random (from ``seed``) on a real device and empty on ``meta``. ``timestep`` is the scheduler's
    (0..1000); the call gets what the family's pipeline passes for it (FLUX, QwenImage, Flux2: t / 1000;
    Lumina2: 1 - t / 1000; CogVideoX: an integer; the others t).
    """
    if name not in _INPUTS:
        raise ValueError(f"unknown family {name!r}; families: {list(_CONFIGS)}")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    loop = loop_of(name)
    t = torch.full((batch,), loop.timestep(timestep / 1000), device=device, dtype=dtype)
    call = _Call(model, batch, frames, height, width, text_tokens, t.long() if loop.integer else t, rand)
    return {**_INPUTS[name](call), "return_dict": False}


def family_of(model: torch.nn.Module) -> str | None:
    """The benchmark family of a diffusers transformer (its class or a base, through the presets), or None."""
    found = presets.find(model)
    return found.name if found is not None and found.name in _CONFIGS else None


def apply_ideal(model: torch.nn.Module, config: CacheConfig, num_steps: int | None = None):
    """The bound a cache is measured against: the family preset's blocks return their inputs on forecast steps
    (same schedule and hook machinery, no forecast work; wrong outputs, for timing only)."""

    return apply(model, config, num_steps=num_steps, skip_all=True)


def apply_preset(model: torch.nn.Module, config: CacheConfig, num_steps: int | None = None, **options):
    """This project's cache on ``model`` through its family preset (what the benchmark's ``ours`` rows run)."""

    found = presets.find(model)
    if found is None:
        raise ValueError(f"no preset for {type(model).__name__}")
    return apply(model, config, preset=presets.get(found.name, **options), num_steps=num_steps)


BENCH_ROWS: dict[str, Callable] = {"ours": apply_preset, "ideal": apply_ideal}

# The generic recipe's modules (docs/any_model.md): pre-gate branches by name, and the cross-attention beside them.
PLAIN_MODULES = {"wan": ["blocks.*.attn1", "blocks.*.ffn"],
                 "sd3": ["transformer_blocks.*.attn", "transformer_blocks.*.ff"],
                 "pixart": ["transformer_blocks.*.attn1", "transformer_blocks.*.ff"],
                 "cogvideox": ["transformer_blocks.*.attn1", "transformer_blocks.*.ff"]}
CROSS_MODULES = {"wan": ["blocks.*.attn2"], "pixart": ["transformer_blocks.*.attn2"]}


def sample(case: BenchCase, steps: int = 50) -> torch.Tensor:
    """A flow-matching Euler loop over ``case``'s model (noise level 1 -> 0, each timestep as the family's pipeline
    passes it): what the benchmark times. The model's output is fed back as the velocity; where the channel counts
    differ, the first channels are the latents (PixArt's learned-sigma outputs dropped, HunyuanVideo 1.5's
    condition channels kept as they are). Each call runs in the model's ``cache_context("cond")`` where it has one,
    as the pipelines call it (diffusers' own cache hooks need one on some models)."""
    loop = loop_of(case.family)
    x = case.inputs["hidden_states"].clone()
    d = loop.channel_dim
    context = getattr(case.model, "cache_context", lambda _name: contextlib.nullcontext())
    for i in range(steps):
        t = torch.full((x.shape[0],), loop.timestep(1 - i / steps), device=x.device, dtype=x.dtype)
        with torch.no_grad(), context("cond"):
            v = case(hidden_states=x, timestep=t.long() if loop.integer else t)[0]
        n = min(x.shape[d], v.shape[d])
        latents = x.narrow(d, 0, n) - v.narrow(d, 0, n).to(x.dtype) / (loop.sign * steps)
        x = latents if n == x.shape[d] else torch.cat([latents, x.narrow(d, n, x.shape[d] - n)], dim=d)
    return x


def forecast_costs(name: str, size: str = "mid", config: CacheConfig | None = None) -> dict[str, dict]:
    """Counted cost of one forecast step of the family's benchmark model, per variant: kernels, bytes moved and FLOPs
    (taylorseer.perf.opcount, FlopCounterMode); ``full`` is a computed step. On the meta device (shapes only), or on
    the CPU for the families whose forward reads input values (:func:`count_device`)."""

    config = config or CacheConfig(interval=5, max_order=1, first_enhance=1)
    case = bench_case(name, size, device=count_device(name))
    variants = {"ours": dict(), "ideal": dict(skip_all=True)}
    if name in PLAIN_MODULES:
        variants["plain modules"] = dict(modules=PLAIN_MODULES[name])
    if name in CROSS_MODULES:
        variants["plain + cross-attention"] = dict(modules=PLAIN_MODULES[name] + CROSS_MODULES[name])
    out = {}
    with torch.no_grad():
        full = count_ops(case)
        out["full"] = dict(kernels=full.kernels, bytes=full.bytes, flops=count_flops(case))
        for label, kwargs in variants.items():
            cache = apply(case.model, config, num_steps=50, **kwargs)
            try:
                for _ in range(config.interval + 1):  # full steps 0 and N: the forecast reads O+1 factors
                    case()
                ops, flops = count_ops(case), count_flops(case)
                held = cache.nbytes()
            finally:
                remove(case.model)
            out[label] = dict(kernels=ops.kernels, bytes=ops.bytes, flops=flops, cache_bytes=held)
    return out


def main(argv=None) -> dict:
    """``python -m taylorseer.attach.families``: the counted forecast-step costs of every family's benchmark model."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--size", default="mid", choices=["mid", "smoke"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = {name: forecast_costs(name, args.size) for name in NAMES}
    if args.json:
        print(json.dumps(result, indent=1))
        return result
    print("| family | variant | kernels | MB moved | share of a full step's bytes | cache MB (O=1) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in result.items():
        full = rows["full"]
        for label, row in rows.items():
            cache = f"{row['cache_bytes'] / 1e6:.1f}" if "cache_bytes" in row else ""
            print(f"| {name} | {label} | {row['kernels']} | {row['bytes'] / 1e6:.1f} | "
                  f"{100 * row['bytes'] / full['bytes']:.1f}% | {cache} |")
    return result


if __name__ == "__main__":
    main()
