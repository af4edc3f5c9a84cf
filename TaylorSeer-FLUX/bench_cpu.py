"""Wall-time benchmark on the CPU: a FLUX-architecture transformer, 50 Euler steps, cached vs uncached.

    bash scripts/bench_flux_cpu.sh [--rounds 3] [--json out.json]

Model: diffusers' FluxTransformer2DModel with 4 double + 8 single blocks, hidden 256 (2 heads x 128, FLUX's
rope axes), 1024 image tokens (a 512x512 image), 512 text tokens, random weights and inputs. Variants,
run in alternation (one round runs each once, so slow drifts of a shared machine hit them all alike):

    uncached         the transformer as it is
    ours O=1 / O=2   this project's cache, N=6, warm-up 3 (10 of 50 steps computed)
    ours O=1 +text   the same, forecasting the text tokens too (same output, more work)
    diffusers        diffusers' own hook, TaylorSeerCacheConfig(cache_interval=6, disable_cache_before_step=3)
                     (its default bf16 factors, attention modules only; it computes 11 of 50 steps)
    ideal            every block skipped on the 40 forecast steps (the bound for this schedule)

Speedups are medians over rounds of (uncached time / variant time) within the same round. The error column
is ||x - x_uncached|| / ||x_uncached|| of the final latents.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from taylorseer import CacheConfig, remove

from .cache import apply_flux_cache, apply_skip_all
from .flops import FLUX_DEV_TRANSFORMER, transformer_inputs

BENCH_TRANSFORMER = {**FLUX_DEV_TRANSFORMER, "num_layers": 4, "num_single_layers": 8, "num_attention_heads": 2,
                     "joint_attention_dim": 512}
PAPER = dict(interval=6, first_enhance=3)


def euler(transformer, inputs: dict, steps: int) -> torch.Tensor:
    """Flow-matching Euler sampling as FluxPipeline does it: x <- x + (sigma_next - sigma) * v."""
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = sigmas[i].expand(x.shape[0])
        with transformer.cache_context("cond"):
            v = transformer(**{**inputs, "hidden_states": x, "timestep": t})[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def variants() -> dict[str, tuple[Callable, Callable]]:
    """name -> (attach(transformer, steps), detach(transformer))."""

    def ours(order: int, **kwargs):
        return (lambda tr, steps: apply_flux_cache(tr, CacheConfig(max_order=order, **PAPER), steps, **kwargs), remove)

    def diffusers_hook(tr, steps):
        from diffusers import TaylorSeerCacheConfig

        tr.enable_cache(TaylorSeerCacheConfig(cache_interval=6, disable_cache_before_step=3))

    return {
        "uncached": (lambda tr, steps: None, lambda tr: None),
        "ours O=1": ours(1),
        "ours O=2": ours(2),
        "ours O=1 +text": ours(1, forecast_text=True),
        "diffusers": (diffusers_hook, lambda tr: tr.disable_cache()),
        "ideal": (lambda tr, steps: apply_skip_all(tr, CacheConfig(max_order=1, **PAPER), steps), remove),
    }


def run(rounds: int = 3, steps: int = 50, image_tokens: int = 1024, text_tokens: int = 512,
        threads: int | None = None) -> dict:
    from diffusers import FluxTransformer2DModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**BENCH_TRANSFORMER).eval()
    inputs = transformer_inputs(BENCH_TRANSFORMER, image_tokens, text_tokens, device="cpu")
    table = variants()
    times: dict[str, list[float]] = {name: [] for name in table}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        euler(transformer, inputs, 2)  # warm-up: first-call allocations and kernel selection
        for r in range(rounds):
            for name, (attach, detach) in table.items():
                attach(transformer, steps)
                transformer._reset_stateful_cache()  # fresh state for every cache, ours and diffusers'
                start = time.perf_counter()
                outputs[name] = euler(transformer, inputs, steps)
                times[name].append(time.perf_counter() - start)
                detach(transformer)
                print(f"round {r + 1}/{rounds} {name:15s} {times[name][-1]:7.2f} s", flush=True)
    reference = outputs["uncached"]
    ideal = statistics.median(u / t for u, t in zip(times["uncached"], times["ideal"], strict=True))
    rows = {}
    for name in table:
        speedup = statistics.median(u / t for u, t in zip(times["uncached"], times[name], strict=True))
        error = float((outputs[name] - reference).norm() / reference.norm())
        rows[name] = dict(seconds=statistics.median(times[name]), speedup=speedup, of_ideal=speedup / ideal,
                          rel_error=error, times=times[name])
    setup = dict(model=BENCH_TRANSFORMER, image_tokens=image_tokens, text_tokens=text_tokens, steps=steps,
                 rounds=rounds, threads=torch.get_num_threads(), torch=torch.__version__)
    return dict(setup=setup, rows=rows)


def format_table(result: dict) -> str:
    s = result["setup"]
    lines = [f"FLUX-architecture transformer, {s['model']['num_layers']} double + {s['model']['num_single_layers']} "
             f"single blocks, hidden {s['model']['num_attention_heads'] * s['model']['attention_head_dim']}, "
             f"{s['image_tokens']} image + {s['text_tokens']} text tokens, {s['steps']} steps, CPU "
             f"({s['threads']} threads), median of {s['rounds']} alternating rounds",
             "", "| variant | time (s) | speedup | of ideal | rel. error vs uncached |", "|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['speedup']:.2f}x | {100 * row['of_ideal']:.0f}% | "
                     f"{row['rel_error']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-tokens", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.steps, args.image_tokens, args.text_tokens, args.threads)
    print(format_table(result))
    if args.json:
        from taylorseer.runs import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
