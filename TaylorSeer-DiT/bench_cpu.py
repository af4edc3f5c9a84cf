"""Wall speedup vs FLOPs compression of TaylorSeer on a mid-size DiT (random weights), in one run.

    bash scripts/bench_dit_cpu.sh                         # DiT-S/2 at 256 (32x32 latents), 50 DDIM steps
    python -m taylorseer_dit.bench_cpu --model DiT-B/2 --repeats 3

Each cached setting is timed alternately with the uncached sampler (A B A B ...), and the speedup
is the ratio of the medians: drift of the machine hits both sides alike. Run it with nothing else
on the machine. Random weights with adaLN gates that are not zero, so every block does real work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer_eval.fidelity import finite_mean, psnr

from .diffusion import GaussianDiffusion
from .models import DiT_models
from .sampling import attach_cache, count_flops, sample


def time_sampling(model, diffusion, labels, cfg_scale, config: CacheConfig | None) -> tuple[float, torch.Tensor]:
    if config is not None:
        attach_cache(model, config, diffusion.num_steps)
    try:
        start = time.perf_counter()
        out = sample(model, diffusion, labels, cfg_scale, seed=0)
        return time.perf_counter() - start, out
    finally:
        taylorseer.remove(model)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=1, help="images per sampling call (CFG doubles the batch)")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=args.latent_size).eval()
    model.initialize_weights(zero_init=False)
    diffusion = GaussianDiffusion(args.steps, "ddim")
    labels = torch.arange(args.images) % 1000
    time_sampling(model, diffusion, labels, args.cfg_scale, None)  # warm-up
    print(f"{args.model}, {args.latent_size}x{args.latent_size} latents, {args.steps} DDIM steps, "
          f"{args.images} image(s) x CFG, {torch.get_num_threads()} threads")
    rows = []
    for n in args.intervals:
        for o in args.orders:
            config = CacheConfig(interval=n, max_order=o, first_enhance=args.warmup)
            base, cached = [], []
            for _ in range(args.repeats):
                t_base, ref = time_sampling(model, diffusion, labels, args.cfg_scale, None)
                t_cached, out = time_sampling(model, diffusion, labels, args.cfg_scale, config)
                base.append(t_base)
                cached.append(t_cached)
            attach_cache(model, config, args.steps)
            flops = count_flops(model, config, args.steps, args.cfg_scale)
            taylorseer.remove(model)
            row = dict(N=n, O=o, full_steps=flops.full_steps, flops_compression=flops.compression,
                       uncached_s=statistics.median(base), cached_s=statistics.median(cached),
                       psnr_latent=finite_mean(psnr((out.clamp(-4, 4) + 4) / 8, (ref.clamp(-4, 4) + 4) / 8)))
            row["wall_speedup"] = row["uncached_s"] / row["cached_s"]
            row["efficiency"] = row["wall_speedup"] / row["flops_compression"]
            rows.append(row)
            print(f"N={n} O={o}: {row['full_steps']}/{args.steps} full, FLOPs {row['flops_compression']:.2f}x, "
                  f"wall {row['uncached_s']:.2f}s -> {row['cached_s']:.2f}s = {row['wall_speedup']:.2f}x "
                  f"({row['efficiency']:.0%} of the FLOPs compression), latent PSNR {row['psnr_latent']:.1f} dB")
    return rows


if __name__ == "__main__":
    main()
