"""What the memory-light forecast step costs in fidelity and saves in bytes (``cache.forecast_step=per_stream``).

    python -m taylorseer_eval.stream_fidelity                      # both bundled models, markdown on stdout
    python -m taylorseer_eval.stream_fidelity --models digits --samples 20 --schedules paper-O1 budget-K10-O1
    python -m taylorseer_eval.stream_fidelity --full-size          # bytes and kernels at full size (meta, ~2 min)

Per branch (``collapsed``, the default: one factor set per branch and block) against per stream (one factor set
per residual stream and run: the factors of the stream's total update over the blocks), each against the uncached
samples of the same seeds, on both bundled models:

* ``digits``: the bundled digits DiT (DDIM-50, cfg 2.0; 100 samples, classes i % 10, one batch seeded 0: the
  sampling of :mod:`taylorseer_eval.store_fidelity`);
* ``digits-flux``: the bundled digits FLUX pipeline (Euler 50 steps, FLUX.1-dev's shifted sigmas; image i is
  ``"digit {i % 10}"`` seeded i).

Each at the paper's rule (DiT N=4, warm-up 2, O=0/1/2; FLUX N=6, warm-up 3, O=0/1/2), the budget rule and the
calibrated schedule (K=10 computed steps of 50, warm-up 1, O=1, the bundled calibrations): PSNR of the float
images (in [0, 1]) and FID in the bundled digits classifier's feature space (the digits tables' FID; the FLUX
model's 16x16 images averaged down to 8x8 first, as ``taylorseer_eval.digits_metrics`` does), both against the
uncached samples. Bytes are what the cache held at the end of the call. ``--full-size`` counts the cache bytes of
FLUX.1-dev at 1024x1024 and HunyuanVideo at 480x640x65 (bf16, one context) on the meta device with every order
filled, as :mod:`taylorseer_eval.store_fidelity` does, and the kernels of one forecast step
(:mod:`taylorseer_eval.forecast_kernels`). No timing here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig

from .fid import frechet_distance
from .fidelity import finite_mean, psnr
from .report import markdown_table
from .store_fidelity import digits_sampler, forecast_step_traffic

VARIANTS = {"collapsed": "per branch", "per_stream": "per stream"}
CALIBRATIONS = {"digits": "assets/calibrations/digits_dit-ddim50-cfg2.json",
                "digits-flux": "assets/calibrations/digits_flux-50steps.json"}
PAPER = {"digits": dict(interval=4, first_enhance=2), "digits-flux": dict(interval=6, first_enhance=3)}


def schedules(model: str) -> dict[str, dict]:
    """Label -> CacheConfig fields of every schedule measured on ``model``."""
    placed = dict(first_enhance=1, budget=10, max_order=1)
    return {**{f"paper-O{order}": dict(PAPER[model], max_order=order) for order in (0, 1, 2)},
            "budget-K10-O1": dict(placed, schedule="budget"),
            "calibrated-K10-O1": dict(placed, schedule="calibrated", calibration=CALIBRATIONS[model])}


MODELS = tuple(PAPER)
Sampler = Callable[[CacheConfig | None], tuple[torch.Tensor, int]]  # config (None: uncached) -> (images, bytes)


# ------------------------------------------------------------------------------------------------ models
def flux_digits_sampler(num_samples: int = 100) -> Sampler:
    """The bundled digits FLUX pipeline: image i is "digit {i % 10}" seeded i, images in [0, 1], (N, 1, 16, 16)."""
    from taylorseer_flux.cache import attach_cache
    from taylorseer_flux.digits import IMAGE_SIZE, PIPELINE_DIR, TEXT_TOKENS, prompt_of
    from taylorseer_flux.pipeline import generate, load_flux

    pipe = load_flux(str(PIPELINE_DIR), dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = [prompt_of(i % 10) for i in range(num_samples)], list(range(num_samples))

    def run(config, steps=50):
        if config is not None:
            attach_cache(pipe.transformer, config, steps)
        try:
            out = generate(pipe, prompts, seeds, num_steps=steps, height=IMAGE_SIZE, width=IMAGE_SIZE,
                           guidance_scale=0.0, max_sequence_length=TEXT_TOKENS, output_type="pt")
        finally:
            taylorseer.remove(pipe.transformer)
        return torch.stack(list(out.images)).float(), out.cache_bytes

    return run


def sampler_of(model: str, num_samples: int) -> Sampler:
    if model == "digits":
        return digits_sampler(num_samples)
    if model == "digits-flux":
        return flux_digits_sampler(num_samples)
    raise ValueError(f"unknown model {model!r}: expected some of {list(MODELS)}")


def digits_features(images: torch.Tensor) -> torch.Tensor:
    """The bundled classifier's 128-d features of images in [0, 1]; larger ones averaged down to 8x8 first."""
    from taylorseer_dit.digits import load_classifier

    if images.shape[-1] != 8:
        images = torch.nn.functional.avg_pool2d(images, kernel_size=images.shape[-1] // 8)
    with torch.no_grad():
        return load_classifier().features(images * 2 - 1)


# ------------------------------------------------------------------------------------------------ fidelity
def measure(model: str, sampler: Sampler, labels=None, progress: bool = True) -> list[dict]:
    """Rows of one model: every schedule (``labels``: a subset), per branch and per stream."""
    uncached, _ = sampler(None)
    reference = digits_features(uncached)
    chosen = {k: v for k, v in schedules(model).items() if labels is None or k in labels}
    rows = []
    for label, settings in tqdm(chosen.items(), desc=model, disable=not progress, leave=False):
        for step, name in VARIANTS.items():
            config = CacheConfig(**settings, forecast_step=step)
            images, held = sampler(config)
            rows.append({"model": model, "schedule": label, "tag": config.tag, "factors": name, "cache_bytes": held,
                         "psnr": finite_mean(psnr(images, uncached)),
                         "fid": frechet_distance(digits_features(images), reference)})
    return rows


def run(models=MODELS, num_samples: int = 100, labels=None, progress: bool = True,
        after_each: Callable[[list[dict]], None] | None = None) -> list[dict]:
    rows = []
    for model in models:
        rows += measure(model, sampler_of(model, num_samples), labels, progress)
        if after_each is not None:
            after_each(rows)
    return rows


# ------------------------------------------------------------------------ full size, on the meta device
def full_size_models():
    """(label, model, attach(config), call) of FLUX.1-dev 1024x1024 and HunyuanVideo 480x640x65 (bf16, meta):
    the apps' own attach, and HunyuanVideo as ``taylorseer.apply`` finds it (lean double blocks)."""
    from taylorseer_flux.cache import attach_cache
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, image_tokens, meta_flux, transformer_inputs
    from taylorseer_hunyuan_video.cache import attach_cache as attach_hunyuan
    from taylorseer_hunyuan_video.flops import VideoShape, dummy_inputs, meta_transformer

    flux, merged = meta_flux(FLUX_DEV_TRANSFORMER, torch.bfloat16)
    flux_inputs = transformer_inputs(merged, image_tokens(1024, 1024), 512, dtype=torch.bfloat16)
    hunyuan = meta_transformer()
    hunyuan_inputs = dummy_inputs(hunyuan, VideoShape())
    return [("FLUX.1-dev 1024x1024", flux, lambda c: attach_cache(flux, c), lambda: flux(**flux_inputs)),
            ("HunyuanVideo 480x640x65 (app: upstream double blocks)", hunyuan,
             lambda c: attach_hunyuan(hunyuan, c, single_attention=False), lambda: hunyuan(**hunyuan_inputs)),
            ("HunyuanVideo 480x640x65 (taylorseer.apply: lean)", hunyuan, lambda c: taylorseer.apply(hunyuan, c),
             lambda: hunyuan(**hunyuan_inputs))]


def full_size_rows(orders=(1, 2)) -> list[dict]:
    """Cache bytes with every order filled, per branch and per stream."""
    rows = []
    for label, model, attach, call in full_size_models():
        for order in orders:
            held = {}
            for step, name in VARIANTS.items():
                attach(CacheConfig(max_order=order, factor_dtype="bfloat16", forecast_step=step))
                try:
                    held[name], _ = forecast_step_traffic(model, call, "inductor")
                finally:
                    taylorseer.remove(model)
            rows += [{"model": label, "O": order, "factors": name, "cache_bytes": b, "cache_gb": b / 1e9,
                      "ratio": b / held["per branch"]} for name, b in held.items()]
    return rows


def kernel_rows(order: int = 1) -> list[dict]:
    """Kernels of one forecast step at full size (meta device, :mod:`taylorseer_eval.forecast_kernels`)."""
    from .forecast_kernels import MODELS as KERNEL_MODELS
    from .forecast_kernels import count

    return [{"kernels_of": name, **count(name, order, variants=("collapsed", "per_stream", "bound"))}
            for name in KERNEL_MODELS]


def tables(rows: list[dict]) -> str:
    parts = []
    fidelity = [{**r, "psnr": f"{r['psnr']:.2f}", "fid": f"{r['fid']:.3f}"} for r in rows if "psnr" in r]
    if fidelity:
        parts.append(markdown_table(fidelity, ["model", "schedule", "tag", "factors", "cache_bytes", "psnr", "fid"],
                                    ["model", "schedule", "tag", "factors", "cache bytes", "PSNR vs uncached (dB)",
                                     "FID vs uncached"]))
    full = [{**r, "cache_gb": f"{r['cache_gb']:.3f}", "ratio": f"{r['ratio']:.4f}"} for r in rows if "O" in r]
    if full:
        parts.append(markdown_table(full, ["model", "O", "factors", "cache_bytes", "cache_gb", "ratio"],
                                    ["model (bf16, meta device, one context)", "O", "factors", "cache bytes",
                                     "cache GB", "of per branch"]))
    kernels = [r for r in rows if "kernels_of" in r]
    if kernels:
        parts.append(markdown_table(kernels, ["kernels_of", "collapsed", "per_stream", "bound"],
                                    ["kernels of one forecast step (meta, bf16, O=1)", "per branch (collapsed)",
                                     "per stream", "bound (every block skipped)"]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--schedules", nargs="+", default=None,
                        help=f"a subset of the schedules (default: all of {list(schedules('digits'))})")
    parser.add_argument("--markdown", help="also write the tables into this file")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--full-size", action="store_true",
                        help="only the full-size counts (meta device): cache bytes, kernels of a forecast step")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    unknown = sorted(set(args.schedules or ()) - set(schedules("digits")))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}: expected some of {list(schedules('digits'))}")

    def write(rows):
        if args.markdown:
            from taylorseer.harness.runs import write_text

            write_text(args.markdown, tables(rows))

    if args.full_size:
        rows = full_size_rows() + kernel_rows()
        write(rows)
    else:
        rows = run(args.models, args.samples, args.schedules, progress=not args.no_progress, after_each=write)
    print(tables(rows))
    return rows


if __name__ == "__main__":
    main()

