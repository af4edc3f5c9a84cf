"""Random transformers of each diffusers family and their inputs: for the benchmark, discovery and FLOPs.

    case = families.bench_case("wan", size="mid")      # a random WanTransformer3DModel and one step's inputs
    out = case.model(**case.inputs)                      # one denoiser call
    families.apply_ideal(case.model, config, 50)         # the bound: every block skipped on forecast steps

Sizes: ``"mid"`` is the benchmark model of issue 13 (4 blocks, hidden 256 = 2 heads x 128, about 1024
image/video tokens and a few hundred text tokens, random weights: what the CPU speedups in docs/any_model.md
are measured on); ``"smoke"`` is tiny (2 blocks, hidden 32) for tests. ``inputs(name, model)`` builds a call
of any size for a model of the family (random values, or shapes only on the ``meta`` device).
"""

from __future__ import annotations

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

# Tokens of one call at each size: (latent frames, latent height, latent width, text tokens).
_SHAPES = {
    "wan": {"mid": (4, 32, 32, 256), "smoke": (2, 4, 4, 8)},  # 4 x 16 x 16 = 1024 video tokens
    "sd3": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},  # 32 x 32 = 1024 image tokens
    "pixart": {"mid": (1, 64, 64, 256), "smoke": (1, 8, 8, 8)},
    "cogvideox": {"mid": (4, 32, 32, 226), "smoke": (2, 4, 4, 16)},  # text = max_text_seq_length
    "flux": {"mid": (1, 64, 64, 512), "smoke": (1, 16, 16, 16)},  # packed 2x2: 1024 image tokens
    "hunyuan_video": {"mid": (4, 32, 32, 256), "smoke": (2, 4, 4, 8)},
}
_CONFIGS = {"wan": _WAN, "sd3": _SD3, "pixart": _PIXART, "cogvideox": _COGVIDEOX, "flux": _FLUX,
            "hunyuan_video": _HUNYUAN}
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


def inputs(name: str, model: torch.nn.Module, *, batch: int = 1, frames: int = 1, height: int = 64,
           width: int = 64, text_tokens: int = 128, seed: int = 1, timestep: float = 500.0) -> dict:
    """Keyword arguments of one denoiser call for ``model`` (family ``name``) at the given latent size.

    Values are random (from ``seed``) on a real device and empty on ``meta``. ``timestep`` is on the
    family's scale (0..1000; FLUX's and HunyuanVideo's pipelines pass t / 1000 and t).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        if device.type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    c = model.config
    t = torch.full((batch,), timestep, device=device, dtype=dtype)
    if name == "wan":
        return dict(hidden_states=rand(batch, c.in_channels, frames, height, width), timestep=t,
                    encoder_hidden_states=rand(batch, text_tokens, c.text_dim), return_dict=False)
    if name == "sd3":
        largest = c.pos_embed_max_size * c.patch_size  # its position embedding is cropped, never extended
        height, width = min(height, largest), min(width, largest)
        return dict(hidden_states=rand(batch, c.in_channels, height, width), timestep=t,
                    encoder_hidden_states=rand(batch, text_tokens, c.joint_attention_dim),
                    pooled_projections=rand(batch, c.pooled_projection_dim), return_dict=False)
    if name == "pixart":
        extra = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArt-Alpha 1024: the image size and aspect ratio are embedded
            extra = {"resolution": torch.full((batch, 2), 8.0 * height, device=device, dtype=dtype),
                     "aspect_ratio": torch.full((batch, 1), width / height, device=device, dtype=dtype)}
        return dict(hidden_states=rand(batch, c.in_channels, height, width), timestep=t,
                    encoder_hidden_states=rand(batch, text_tokens, c.caption_channels), added_cond_kwargs=extra,
                    return_dict=False)
    if name == "cogvideox":
        text_tokens = c.max_text_seq_length  # its positional embedding covers exactly this many (pipelines pad)
        return dict(hidden_states=rand(batch, frames, c.in_channels, height, width), timestep=t.long(),
                    encoder_hidden_states=rand(batch, text_tokens, c.text_embed_dim), return_dict=False)
    if name == "flux":
        tokens = (height // 2) * (width // 2)
        out = dict(hidden_states=rand(batch, tokens, c.in_channels), timestep=t / 1000,
                   encoder_hidden_states=rand(batch, text_tokens, c.joint_attention_dim),
                   pooled_projections=rand(batch, c.pooled_projection_dim), img_ids=rand(tokens, 3),
                   txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype), return_dict=False)
        if c.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return out
    if name == "hunyuan_video":
        out = dict(hidden_states=rand(batch, c.in_channels, frames, height, width), timestep=t,
                   encoder_hidden_states=rand(batch, text_tokens, c.text_embed_dim),
                   encoder_attention_mask=torch.ones(batch, text_tokens, device=device, dtype=dtype),
                   pooled_projections=rand(batch, c.pooled_projection_dim), return_dict=False)
        if c.guidance_embeds:
            out["guidance"] = torch.full((batch,), 6000.0, device=device, dtype=dtype)
        return out
    raise ValueError(f"unknown family {name!r}; families: {list(_CONFIGS)}")


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
    """A flow-matching Euler loop over ``case``'s model (timesteps 1000 -> 0 on the family's scale): what the
    benchmark times. The model's output is fed back as the velocity (learned-sigma channels dropped)."""
    x = case.inputs["hidden_states"].clone()
    scale = 1.0 if case.family == "flux" else 1000.0
    channel_dim = 2 if case.family in ("cogvideox", "flux") else 1
    for i in range(steps):
        t = torch.full((x.shape[0],), (1 - i / steps) * scale, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            v = case(hidden_states=x, timestep=t.long() if case.family == "cogvideox" else t)[0]
        x = x - v.narrow(channel_dim, 0, x.shape[channel_dim]) / steps
    return x


def forecast_costs(name: str, size: str = "mid", config: CacheConfig | None = None) -> dict[str, dict]:
    """Counted cost of one forecast step of the family's benchmark model (meta device: shapes only), per variant:
    kernels, bytes moved and FLOPs (taylorseer.perf.opcount, FlopCounterMode); ``full`` is a computed step."""

    config = config or CacheConfig(interval=5, max_order=1, first_enhance=1)
    case = bench_case(name, size, device="meta")
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
