"""Count FLOPs of full-size models on the meta device (no weights, no GPU): uncached vs cached.

    bash scripts/count_flops.sh                                   # every model at its paper setting
    bash scripts/count_flops.sh flux-dev --interval 6 --order 2   # one model, other settings
    bash scripts/count_flops.sh dit-xl-2-256 --interval 4 --json  # JSON for scripts

FLOPs are torch's FlopCounterMode count (2 per multiply-add; the DiT paper's "Gflops" are
multiply-adds, half of ours). One computed and one forecast denoiser call are counted and the run
total follows from the schedule: ``full * F_full + forecast * F_forecast``, per image or video.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from taylorseer import CacheConfig, FlopsReport

# name -> (paper cache defaults (N, O, warm-up), counter(cache_config, num_steps) -> FlopsReport)
MODELS: dict[str, tuple[tuple[int, int, int], Callable[[CacheConfig, int], FlopsReport]]] = {}


def _dit(image_size: int):
    def count(config: CacheConfig, steps: int) -> FlopsReport:
        from taylorseer_dit.flops import count_run_flops

        return count_run_flops(config, "DiT-XL/2", image_size, steps, cfg_scale=1.5)

    return count


def _flux(config: CacheConfig, steps: int) -> FlopsReport:
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, count_run_flops

    return count_run_flops(FLUX_DEV_TRANSFORMER, config, steps, height=1024, width=1024)


def _hunyuan_video(config: CacheConfig, steps: int) -> FlopsReport:
    from taylorseer_hunyuan_video.flops import count_run_flops

    return count_run_flops(config, num_steps=steps, single_attention=False)


MODELS["dit-xl-2-256"] = ((3, 3, 2), _dit(256))
MODELS["dit-xl-2-512"] = ((3, 3, 2), _dit(512))
MODELS["flux-dev"] = ((6, 1, 3), _flux)
MODELS["hunyuan-video"] = ((5, 1, 1), _hunyuan_video)
DESCRIPTIONS = {
    "dit-xl-2-256": "DiT-XL/2 256x256, DDIM, CFG batch of 2 per image",
    "dit-xl-2-512": "DiT-XL/2 512x512, DDIM, CFG batch of 2 per image",
    "flux-dev": "FLUX.1-dev 1024x1024 (4096 image + 512 text tokens)",
    "hunyuan-video": "HunyuanVideo 480x640x65 (20,400 video + 256 text tokens)",
}


def count(name: str, steps: int = 50, interval: int | None = None, order: int | None = None,
          warmup: int | None = None) -> dict:
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    (n, o, w), counter = MODELS[name]
    config = CacheConfig(interval=interval or n, max_order=o if order is None else order,
                         first_enhance=w if warmup is None else warmup)
    report = counter(config, steps)
    return {"model": name, "setting": DESCRIPTIONS[name], "cache": config.tag, **report.to_dict()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"any of {list(MODELS)} (default: all)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, help="cache interval N (default: the paper's per model)")
    parser.add_argument("--order", type=int, help="Taylor order O")
    parser.add_argument("--warmup", type=int, help="first_enhance")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = [count(m, args.steps, args.interval, args.order, args.warmup) for m in args.models]
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print("| model | cache | full steps | TFLOPs/full step | TFLOPs/forecast step | uncached TFLOPs | cached TFLOPs "
          "| compression |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['cache']} | {r['full_steps']}/{r['num_steps']} | "
              f"{r['full_step_flops'] / 1e12:.4f} | {r['forecast_step_flops'] / 1e12:.4f} | "
              f"{r['tflops_uncached']:.2f} | {r['tflops_total']:.2f} | {r['compression']:.3f}x |")
    print("FLOPs: torch FlopCounterMode on the meta device, 2 per multiply-add, per image/video.")
    return rows


if __name__ == "__main__":
    main()
