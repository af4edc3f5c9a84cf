"""What a smaller factor store costs in fidelity, and what it saves in bytes (``cache.factor_store``).

    python -m taylorseer_eval.store_fidelity                         # every model below, markdown on stdout
    python -m taylorseer_eval.store_fidelity --models digits --digits-samples 200 --markdown runs/store.md
    python -m taylorseer_eval.store_fidelity --full-size     # bytes of full-size FLUX.1-dev / HunyuanVideo (meta)

Each model samples the same seeds with the cache at the paper's settings and each store: dense fp32
factors, dense bf16 factors (the GPU default), 8-bit factors (``float8``: e4m3 + per-token fp32 scale, and
the per-channel and e5m2-difference variants), dequantised to fp32 (the CPU default) or bf16 (the GPU one).

* ``digits``: the bundled digits DiT (DDIM-50, cfg 2.0, warm-up 2): PSNR of the cached samples against the
  uncached ones and against the samples of the fp32-factor cache (the store's own cost).
* ``flux-pipeline`` / ``hunyuan-pipeline``: the tiny random pipelines of the tests (``tests/tiny_flux.py``,
  ``tests/tiny_hunyuan.py``, hidden 32), saved and loaded like the real ones, 50 steps: relative L2 error of
  the final latent against the uncached latent and against the fp32-factor and bf16-factor caches.
* ``flux-mid`` / ``hunyuan-mid``: the benchmark's mid-size random models (hidden 256, 1024-1280 tokens,
  :mod:`taylorseer_eval.bench_families`), the same errors.

Bytes are what the cache held at the end of the call. ``--full-size`` counts, on the meta device, the cache
bytes of FLUX.1-dev at 1024x1024 and HunyuanVideo at 480x640x65 (bf16) and the bytes one forecast step's
gated adds move with the ``addcmul`` chain and with the fused kernel. No timing here: wall time belongs to
the benchmark on a quiet machine (``bash scripts/benchmark.sh``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig

from .fidelity import finite_mean, psnr
from .report import markdown_table

TESTS = Path(__file__).resolve().parents[1] / "tests"  # the tiny pipelines' builders


@dataclass(frozen=True)
class Store:
    label: str
    settings: dict  # CacheConfig fields

    def config(self, interval: int, order: int, warmup: int) -> CacheConfig:
        return CacheConfig(interval=interval, max_order=order, first_enhance=warmup, **self.settings)


STORES = [
    Store("dense fp32", dict(factor_dtype="float32")),
    Store("dense bf16", dict(factor_dtype="bfloat16")),
    Store("float8 -> fp32", dict(factor_store="float8", factor_dtype="float32")),
    Store("float8 -> bf16", dict(factor_store="float8", factor_dtype="bfloat16")),
    Store("float8 per channel -> fp32", dict(factor_store="float8", factor_scale="channel", factor_dtype="float32")),
    Store("float8_e5m2 -> fp32", dict(factor_store="float8_e5m2", factor_dtype="float32")),
]
REFERENCES = ("dense fp32", "dense bf16")

# (interval, orders, warm-up) per model: the paper's N and warm-up
SETTINGS = {"digits": (4, (1, 2), 2), "flux": (6, (1, 2), 3), "hunyuan": (5, (1, 2), 1)}

Sampler = Callable[[CacheConfig | None], tuple[torch.Tensor, int]]  # config (None: uncached) -> (output, bytes)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def measure(model: str, sampler: Sampler, kind: str, stores=STORES, progress: bool = True) -> list[dict]:
    """Rows of one model: every store at every order of its setting; ``kind`` is "images" (PSNR) or "latent"."""
    interval, orders, warmup = SETTINGS[model.split("-")[0]]
    uncached, _ = sampler(None)
    rows = []
    for order in orders:
        outputs, held = {}, {}
        for store in tqdm(stores, desc=f"{model} O={order}", disable=not progress, leave=False):
            outputs[store.label], held[store.label] = sampler(store.config(interval, order, warmup))
        for store in stores:
            out = outputs[store.label]
            row = {"model": model, "tag": store.config(interval, order, warmup).tag, "store": store.label,
                   "cache_bytes": held[store.label]}
            if kind == "images":
                row["vs_uncached"] = finite_mean(psnr(out, uncached))
                row["vs_dense_fp32"] = finite_mean(psnr(out, outputs["dense fp32"]))
            else:
                row["vs_uncached"] = rel_error(out, uncached)
                for ref in REFERENCES:
                    row[f"vs_{ref.replace(' ', '_')}"] = rel_error(out, outputs[ref])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ models
def digits_sampler(num_samples: int = 100) -> Sampler:
    """The demo's sampling (same seeds: one batch seeded 0, classes i % 10), with the cache's bytes."""
    from taylorseer_dit.cache import attach_cache
    from taylorseer_dit.diffusion import GaussianDiffusion
    from taylorseer_dit.digits import DIT_CHECKPOINT
    from taylorseer_dit.pipeline import load_dit, sample, to_images

    torch.manual_seed(0)
    model = load_dit(DIT_CHECKPOINT)
    diffusion = GaussianDiffusion(50, "ddim")
    labels = torch.arange(num_samples) % 10

    def run(config):
        cache = attach_cache(model, config or CacheConfig(enabled=False), diffusion.num_steps)
        try:
            images = to_images(sample(model, diffusion, labels, 2.0, 0))
            return images, cache.nbytes()
        finally:
            taylorseer.remove(model)

    return run


def flux_pipeline_sampler(folder: Path) -> Sampler:
    sys.path.insert(0, str(TESTS))
    from tiny_flux import IMAGE_SIZE, TEXT_TOKENS, save_tiny_flux

    from taylorseer_flux.cache import attach_cache
    from taylorseer_flux.pipeline import generate, load_flux

    pipe = load_flux(str(save_tiny_flux(folder / "flux")), dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)

    def run(config=None, steps=50):
        if config is not None:
            attach_cache(pipe.transformer, config, steps)
        try:
            out = generate(pipe, ["a photo of the cat"], [0], num_steps=steps, height=IMAGE_SIZE, width=IMAGE_SIZE,
                           max_sequence_length=TEXT_TOKENS, output_type="latent")
        finally:
            taylorseer.remove(pipe.transformer)
        return torch.stack(out.images), out.cache_bytes

    return run


def hunyuan_pipeline_sampler(folder: Path) -> Sampler:
    sys.path.insert(0, str(TESTS))
    from tiny_hunyuan import save_tiny_pipeline

    from taylorseer_hunyuan_video.cache import attach_cache
    from taylorseer_hunyuan_video.pipeline import generate, load_hunyuan_video

    pipe = load_hunyuan_video(str(save_tiny_pipeline(folder / "hunyuan")), dtype=torch.float32, flow_shift=7.0)
    pipe.set_progress_bar_config(disable=True)

    def run(config=None, steps=50):
        if config is not None:
            attach_cache(pipe.transformer, config, steps, single_attention=False)
        try:
            video = generate(pipe, "a cat walks on the beach", 42, num_steps=steps, output_type="latent", height=32,
                             width=32, num_frames=5, max_sequence_length=16, guidance_scale=6.0)
        finally:
            taylorseer.remove(pipe.transformer)
        return video.frames, video.stats.cache_bytes

    return run


def family_sampler(name: str, size: str = "mid") -> Sampler:
    from .bench_families import FAMILIES

    family = FAMILIES[name]
    model, sample = family.build(size, torch.device("cpu"), torch.float32)

    def run(config):
        cache = family.attach(model, config, 50) if config is not None else None
        try:
            out = sample(model, 50)
            return out, (cache.last_call.nbytes if cache is not None and cache.last_call else 0)
        finally:
            taylorseer.remove(model)

    return run


MODELS = ("digits", "flux-pipeline", "hunyuan-pipeline", "flux-mid", "hunyuan-mid")


def run(models=MODELS, digits_samples: int = 100, stores=STORES, progress: bool = True,
        after_each: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Rows of every model in ``models``; ``after_each(rows so far)`` runs after each model (partial results)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            if model == "digits":
                rows += measure(model, digits_sampler(digits_samples), "images", stores, progress)
            elif model == "flux-pipeline":
                rows += measure(model, flux_pipeline_sampler(Path(tmp)), "latent", stores, progress)
            elif model == "hunyuan-pipeline":
                rows += measure(model, hunyuan_pipeline_sampler(Path(tmp)), "latent", stores, progress)
            elif model in ("flux-mid", "hunyuan-mid"):
                family = {"flux-mid": "flux", "hunyuan-mid": "hunyuan_video"}[model]
                rows += measure(model, family_sampler(family), "latent", stores, progress)
            else:
                raise ValueError(f"unknown model {model!r}: expected some of {list(MODELS)}")
            if after_each is not None:
                after_each(rows)
    return rows


# ------------------------------------------------------------------------ full size, on the meta device
def forecast_step_traffic(model: torch.nn.Module, call: Callable[[], object], kernel: str) -> tuple[int, int]:
    """(cache bytes, bytes the gated adds of one forecast step move) with every order filled, counted on the
    meta device (``fused.count_traffic``: the chain's passes, or the fused kernel's one pass)."""
    import dataclasses

    from taylorseer.core.kernels import count_traffic, forecast_kernel

    cache = taylorseer.get_cache(model)
    config = cache.config
    # full steps 0, 2, ..., 2 O (every one forms differences): O+1 factors; step 2 O + 1 is a forecast
    cache.config = dataclasses.replace(config, interval=2, first_enhance=1, last_full_steps=0, offload=False,
                                       prefetch=False)
    cache.reset(num_steps=None)
    try:
        with torch.no_grad():
            for _ in range(2 * config.max_order + 1):
                call()
            held = cache.nbytes()
            with forecast_kernel(kernel), count_traffic() as records:
                call()
        assert not cache.is_full
    finally:
        cache.config = config
        cache.reset()
    return held, sum(r.bytes_moved for r in records)


def full_size_rows(orders=(1, 2), stores=("dense", "float8"), kernels=("addcmul", "inductor")) -> list[dict]:
    """Cache bytes and forecast-step bytes of FLUX.1-dev (1024x1024) and HunyuanVideo (480x640x65), bf16."""
    from taylorseer_flux.cache import attach_cache
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, image_tokens, meta_flux, transformer_inputs
    from taylorseer_hunyuan_video.cache import attach_cache as attach_hunyuan
    from taylorseer_hunyuan_video.flops import VideoShape, dummy_inputs, meta_transformer

    flux, merged = meta_flux(FLUX_DEV_TRANSFORMER, torch.bfloat16)
    flux_inputs = transformer_inputs(merged, image_tokens(1024, 1024), 512, dtype=torch.bfloat16)
    hunyuan = meta_transformer()
    hunyuan_inputs = dummy_inputs(hunyuan, VideoShape())
    models = [("FLUX.1-dev 1024x1024", flux, lambda c: attach_cache(flux, c), lambda: flux(**flux_inputs)),
              ("HunyuanVideo 480x640x65", hunyuan, lambda c: attach_hunyuan(hunyuan, c, single_attention=False),
               lambda: hunyuan(**hunyuan_inputs))]
    rows = []
    for label, model, attach, call in models:
        for order in orders:
            for store in stores:
                attach(CacheConfig(max_order=order, factor_dtype="bfloat16", factor_store=store))
                try:
                    for kernel in kernels:
                        held, moved = forecast_step_traffic(model, call, kernel)
                        rows.append({"model": label, "O": order, "store": store, "kernel": kernel,
                                     "cache_bytes": held, "cache_gb": held / 1e9, "forecast_step_gb": moved / 1e9})
                finally:
                    taylorseer.remove(model)
    return rows


def tables(rows: list[dict]) -> str:
    parts = []
    images = [r for r in rows if r["model"] == "digits"]
    if images:
        parts.append(markdown_table(images, ["model", "tag", "store", "cache_bytes", "vs_uncached", "vs_dense_fp32"],
                                    ["model", "tag", "store", "cache bytes", "PSNR vs uncached (dB)",
                                     "PSNR vs dense fp32 factors (dB)"]))
    latents = [r for r in rows if r["model"] != "digits" and "kernel" not in r]
    if latents:
        fmt = [{**r, **{k: f"{r[k]:.2e}" for k in ("vs_uncached", "vs_dense_fp32", "vs_dense_bf16")}}
               for r in latents]
        parts.append(markdown_table(fmt, ["model", "tag", "store", "cache_bytes", "vs_uncached", "vs_dense_fp32",
                                          "vs_dense_bf16"],
                                    ["model", "tag", "store", "cache bytes", "rel. error vs uncached",
                                     "vs dense fp32 factors", "vs dense bf16 factors"]))
    full = [r for r in rows if "kernel" in r]
    if full:
        parts.append(markdown_table(full, ["model", "O", "store", "cache_bytes", "cache_gb", "kernel",
                                           "forecast_step_gb"],
                                    ["model (bf16, meta device)", "O", "store", "cache bytes", "cache GB",
                                     "forecast kernel", "GB moved by a forecast step's gated adds"]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--digits-samples", type=int, default=100)
    parser.add_argument("--markdown", help="also write the tables into this file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--full-size", action="store_true",
                        help="only the full-size byte counts (meta device, seconds): cache and forecast-step bytes")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    def write(rows):
        if args.markdown:
            from taylorseer.harness.runs import write_text

            write_text(args.markdown, tables(rows))

    if args.full_size:
        rows = full_size_rows()
        write(rows)
    else:
        rows = run(args.models, args.digits_samples, progress=not args.no_progress, after_each=write)
    print(tables(rows))
    return rows


if __name__ == "__main__":
    main()
