"""FLOPs and cache size of full-size HunyuanVideo, counted on the ``meta`` device (no weights, no GPU).

The transformer is built from its real config under ``torch.device("meta")``: every op runs on
shapes only, so PyTorch's ``FlopCounterMode`` counts the true matmul/attention FLOPs of a step
(2 FLOPs per multiply-add) and the cache, attached exactly as for sampling, holds meta tensors whose
byte counts are the real ones. Usage::

    python -m taylorseer_hunyuan_video.flops                       # 480x640x65, 50 steps, N=5 O=1
    python -m taylorseer_hunyuan_video.flops --orders 1 2 --frames 129 --height 720 --width 1280
    python -m taylorseer_hunyuan_video.flops --stores dense float8   # + the 8-bit factor store

Shapes at 480x640x65: the VAE compresses 8x in space and 4x in time (65 frames -> 17 latent
frames, 60x80 latents), the transformer patchifies 1x2x2 -> 17*30*40 = 20,400 video tokens, plus
256 text tokens (the pipeline pads the prompt to ``max_sequence_length``); hidden 3072 = 24 x 128.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
from diffusers import HunyuanVideoTransformer3DModel

import taylorseer
from taylorseer import CacheConfig, FlopsReport
from taylorseer.core.store import FACTOR_STORES, stored_nbytes

from .cache import UPSTREAM_FORM, attach_cache, cached_module_names

# hunyuanvideo-community/HunyuanVideo transformer/config.json (13B parameters).
HUNYUAN_VIDEO_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)


@dataclass(frozen=True)
class VideoShape:
    """One sampled video's size and what it becomes inside the transformer."""

    height: int = 480
    width: int = 640
    num_frames: int = 65
    text_tokens: int = 256  # the pipeline's max_sequence_length
    batch: int = 1
    spatial_compression: int = 8  # AutoencoderKLHunyuanVideo
    temporal_compression: int = 4

    @property
    def latent(self) -> tuple[int, int, int]:
        """(frames, height, width) of the latent video."""
        return ((self.num_frames - 1) // self.temporal_compression + 1, self.height // self.spatial_compression,
                self.width // self.spatial_compression)

    def video_tokens(self, patch_size: int, patch_size_t: int) -> int:
        f, h, w = self.latent
        return (f // patch_size_t) * (h // patch_size) * (w // patch_size)


def meta_transformer(config: dict | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> HunyuanVideoTransformer3DModel:
    """The transformer with shapes only (instant, no memory): for counting, never for sampling."""
    config = {k: v for k, v in dict(config or HUNYUAN_VIDEO_CONFIG).items() if not k.startswith("_")}
    # Create the parameters in ``dtype`` directly (a later .to(dtype) makes diffusers warn about fp32 modules).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = HunyuanVideoTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def dummy_inputs(model: HunyuanVideoTransformer3DModel, shape: VideoShape, device="meta",
                 dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments of one transformer call at ``shape`` (what HunyuanVideoPipeline passes)."""
    cfg = model.config
    dtype = dtype or model.dtype
    b = shape.batch
    return dict(
        hidden_states=torch.zeros(b, cfg.in_channels, *shape.latent, device=device, dtype=dtype),
        timestep=torch.full((b,), 500.0, device=device),
        encoder_hidden_states=torch.zeros(b, shape.text_tokens, cfg.text_embed_dim, device=device, dtype=dtype),
        encoder_attention_mask=torch.ones(b, shape.text_tokens, device=device, dtype=dtype),
        pooled_projections=torch.zeros(b, cfg.pooled_projection_dim, device=device, dtype=dtype),
        guidance=torch.full((b,), 6000.0, device=device, dtype=dtype),
        return_dict=False,
    )


def count_run_flops(cache_config: CacheConfig, shape: VideoShape = VideoShape(), num_steps: int = 50,
                    transformer_config: dict | None = None, calls_per_step: int = 1,
                    single_attention: bool = True, impl: str = "taylorseer") -> FlopsReport:
    """FLOPs of one video's sampling run: one computed and one forecast call counted, the rest from the schedule.

    ``impl="diffusers"`` counts diffusers' own TaylorSeer hook (the peer baseline) instead of this project's cache.
    """
    model = meta_transformer(transformer_config)
    inputs = dummy_inputs(model, shape)

    def call():
        with torch.no_grad():
            model(**inputs)

    if impl == "diffusers" and cache_config.enabled:
        from taylorseer.perf.peers import count_diffusers_schedule

        return count_diffusers_schedule(model, call, cache_config, num_steps, calls_per_step)
    cache = attach_cache(model, cache_config, num_steps, single_attention) if cache_config.enabled else None
    try:
        return taylorseer.count_schedule(call, cache, num_steps, calls_per_step)
    finally:
        taylorseer.remove(model)


@dataclass(frozen=True)
class CacheEstimate:
    max_order: int
    factor_dtype: str
    factor_store: str  # "dense" or an 8-bit store (taylorseer.core.store), with factor_scale
    factor_scale: str
    num_modules: int  # cached modules (a double block's attention counts once, with two output tensors upstream)
    num_tensors: int  # cached tensors (the lean form stores one per module: its video tokens)
    elements_per_order: int  # elements of one factor of every cached tensor
    nbytes: int  # measured from the cache after O+1 full steps on the meta device
    formula_nbytes: int  # (O + 1) x stored bytes of each recorded output shape (taylorseer.core.store.stored_nbytes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"gib": self.nbytes / 2**30, "gb": self.nbytes / 1e9}


def estimate_cache(max_order: int, shape: VideoShape = VideoShape(), factor_dtype: str = "bfloat16",
                   transformer_config: dict | None = None, single_attention: bool = True,
                   factor_store: str = "dense", factor_scale: str = "token",
                   forecast_step: str = "collapsed") -> CacheEstimate:
    """Bytes the cache holds at ``max_order`` for one context (double it for true CFG: cond + uncond), in the form
    ``forecast_step`` chooses (:func:`cache.preset`: the lean form by default, upstream's under ``per_block``).

    ``factor_store="float8"`` counts the 8-bit store (data + per-token scales), measured the same way."""
    model = meta_transformer(transformer_config)
    inputs = dummy_inputs(model, shape)
    shapes: list[tuple[int, ...]] = []
    names = cached_module_names(model, single_attention, forecast_step)
    named = dict(model.named_modules())
    lean = forecast_step != UPSTREAM_FORM
    video = shape.video_tokens(model.config.patch_size, model.config.patch_size_t)

    def record(_module, _args, out):
        outs = out if isinstance(out, tuple) else (out,)
        if lean:  # the video tokens of the first output only (a double block's attention output 0, the ff, the
            first = tuple(outs[0].shape)  # first tokens of a single block's branch over cat(video, text))
            shapes.append(first[:1] + (video,) + first[2:])
            return
        shapes.extend(tuple(t.shape) for t in outs)

    # Hooks see the real outputs on the first full step (registered before the cache wraps forward).
    handles = [named[n].register_forward_hook(record) for n in names]
    # interval 1 + first_enhance 1: every step full and every full step forms derivatives, so O+1
    # calls fill every order.
    config = CacheConfig(interval=1, max_order=max_order, first_enhance=1, factor_dtype=factor_dtype,
                         factor_store=factor_store, factor_scale=factor_scale, forecast_step=forecast_step)
    cache = attach_cache(model, config, max_order + 1, single_attention)
    try:
        with torch.no_grad():
            model(**inputs)
            for h in handles:
                h.remove()
            for _ in range(max_order):
                model(**inputs)
        nbytes = cache.nbytes()
    finally:
        for h in handles:
            h.remove()
        taylorseer.remove(model)
    elements = sum(_numel(s) for s in shapes)
    formula = sum(stored_nbytes(s, max_order + 1, factor_store, factor_scale, getattr(torch, factor_dtype))
                  for s in shapes)
    return CacheEstimate(max_order, factor_dtype, factor_store, factor_scale, len(names), len(shapes), elements,
                         nbytes, formula)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def report(shape: VideoShape, num_steps: int, cache_config: CacheConfig, orders: list[int],
           stores: tuple[str, ...] = ("dense",)) -> str:
    """A markdown summary for the README."""
    base = count_run_flops(CacheConfig(enabled=False), shape, num_steps)
    cached = count_run_flops(cache_config, shape, num_steps)
    tokens = shape.video_tokens(HUNYUAN_VIDEO_CONFIG["patch_size"], HUNYUAN_VIDEO_CONFIG["patch_size_t"])
    lines = [
        f"HunyuanVideo {shape.height}x{shape.width}x{shape.num_frames} (latent {shape.latent}, {tokens} video + "
        f"{shape.text_tokens} text tokens), {num_steps} steps, meta device, FlopCounterMode (2 FLOPs per MAC):",
        "",
        "| run | full steps | TFLOPs per full step | TFLOPs per forecast step | TFLOPs total | compression |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("no cache", base),
        _row(f"TaylorSeer {cache_config.tag}", cached),
        "",
        "| cache (one context) | modules | tensors | bytes | GiB | GB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    forms = ((", lean (the default)", "collapsed", False), (", upstream's form (per_block)", UPSTREAM_FORM, False),
             (", upstream's modules (per_block, single-block attention recorded)", UPSTREAM_FORM, True))
    for store in stores:
        for order in orders:
            for form, step, single_attention in forms:
                est = estimate_cache(order, shape, single_attention=single_attention, factor_store=store,
                                     forecast_step=step)
                assert est.nbytes == est.formula_nbytes, (est.nbytes, est.formula_nbytes)
                label = (f"O={order}, " + ("bf16" if store == "dense" else f"{store} + per-token fp32 scale")
                         + form)
                lines.append(f"| {label} | {est.num_modules} | {est.num_tensors} | {est.nbytes:,} | "
                             f"{est.nbytes / 2**30:.2f} | {est.nbytes / 1e9:.2f} |")
    return "\n".join(lines)


def _row(label: str, r: FlopsReport) -> str:
    return (f"| {label} | {r.full_steps} of {r.num_steps} | {r.full_step_flops / 1e12:.2f} | "
            f"{r.forecast_step_flops / 1e12:.3f} | {r.flops_total / 1e12:.1f} | {r.compression:.3f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2], help="orders for the cache-size table")
    parser.add_argument("--stores", nargs="+", default=["dense"], choices=list(FACTOR_STORES),
                        help="factor stores for the cache-size table (cache.factor_store)")
    args = parser.parse_args(argv)
    shape = VideoShape(args.height, args.width, args.frames, args.text_tokens)
    config = CacheConfig(interval=args.interval, max_order=args.order, first_enhance=args.warmup)
    print(report(shape, args.steps, config, args.orders, tuple(args.stores)))


if __name__ == "__main__":
    main()
