"""Kernels of one forecast step at full size, counted on the ``meta`` device (no weights, no GPU, deterministic).

    python -m taylorseer_eval.forecast_kernels [--order 1] [--markdown]

Per model (DiT-XL/2 256 with its CFG batch of 2, FLUX.1-dev 1024 with 512 text tokens, HunyuanVideo 480x640x65
with 256 text tokens; bf16), the non-view aten ops of one forecast step (taylorseer.perf.opcount) for:

    collapsed   this project's default (cache.forecast_step=collapsed): one update per residual stream
    per_block   every block adds its gated forecasts in turn (cache.forecast_step=per_block)
    per_stream  the memory-light level (cache.forecast_step=per_stream): x_0 + sum_i w_i U_i per stream, no gates
    bound       the same schedule with every block skipped on forecast steps (nothing forecast)

On the meta device the collapsed pass is counted as its eager formula (a multiply, a sum, an add and a cast:
four ops where the compiled kernel launches one), so the count is an upper bound of what a GPU launches.
``depth`` scales every block list (e.g. 0.5: half the blocks) to show the count does not depend on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.perf.opcount import count_ops

MODELS = ("dit-xl-2", "flux-dev", "hunyuan-video")


def _dit(depth: float):
    from taylorseer_dit.models import DiT

    with torch.device("meta"):
        model = DiT(input_size=32, depth=max(1, round(28 * depth))).to(torch.bfloat16).eval()
    x = torch.empty(2, 4, 32, 32, device="meta", dtype=torch.bfloat16)
    t = torch.full((2,), 500, device="meta", dtype=torch.long)
    y = torch.zeros(2, device="meta", dtype=torch.long)
    return model, (lambda: model(x, t, y)), {"preset": "dit"}


def _flux(depth: float):
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, image_tokens, meta_flux, transformer_inputs

    config = {**FLUX_DEV_TRANSFORMER, "num_layers": max(1, round(19 * depth)),
              "num_single_layers": max(1, round(38 * depth))}
    model, merged = meta_flux(config, dtype=torch.bfloat16)
    kwargs = transformer_inputs(merged, image_tokens(1024, 1024), 512)
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    return model, (lambda: model(**kwargs)), {"preset": "flux"}


def _hunyuan(depth: float):
    from taylorseer_hunyuan_video.flops import HUNYUAN_VIDEO_CONFIG, VideoShape, dummy_inputs, meta_transformer

    config = {**HUNYUAN_VIDEO_CONFIG, "num_layers": max(1, round(20 * depth)),
              "num_single_layers": max(1, round(40 * depth))}
    model = meta_transformer(config)
    kwargs = dummy_inputs(model, VideoShape(height=480, width=640, num_frames=65))
    return model, (lambda: model(**kwargs)), {"preset": "auto"}  # lean under collapsed, upstream per block


_BUILDERS = {"dit-xl-2": _dit, "flux-dev": _flux, "hunyuan-video": _hunyuan}


def count(name: str, order: int = 1, depth: float = 1.0, variants=("collapsed", "per_block", "bound")) -> dict:
    """{variant: kernels of one forecast step} for model ``name`` (see the module docstring)."""
    model, call, kwargs = _BUILDERS[name](depth)
    base = CacheConfig(interval=5, max_order=order, first_enhance=1)
    out = {}
    with torch.no_grad():
        for variant in variants:
            step = variant if variant in ("per_block", "per_stream") else "collapsed"
            config = dataclasses.replace(base, forecast_step=step)
            taylorseer.apply(model, config, num_steps=50, skip_all=variant == "bound", **kwargs)
            try:
                for _ in range(base.interval + 1):  # full steps 0 and 5: the forecast reads O+1 factors
                    call()
                out[variant] = count_ops(call).kernels
            finally:
                taylorseer.remove(model)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = {name: count(name, args.order) for name in args.models}
    if args.json:
        print(json.dumps(rows, indent=1))
        return rows
    print(f"| model (O={args.order}, bf16) | collapsed | per block | bound | collapsed / bound |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['collapsed']} | {row['per_block']} | {row['bound']} | "
              f"{row['collapsed'] / row['bound']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
