"""The GPU benchmark: full-size DiT-XL/2, FLUX.1-dev and HunyuanVideo (17 frames) with random bf16 weights.

    bash scripts/bench_gpu.sh --out runs/bench_gpu            # one GPU, no network, under 8 minutes
    bash scripts/bench_gpu.sh --dry-run --out /tmp/bench      # tiny sizes on the CPU: every code path

Imports torch, diffusers and this project only (no Hydra/omegaconf; configs are inline). Per model, 50
steps, one timed run per variant after a short warm-up, in this order so the cheap and important ones
come first: eager with PyTorch SDPA (uncached; ours O=1 and O=2 at the paper's N and warm-up; the ideal;
diffusers' TaylorSeerCacheConfig), then ``taylorseer.compile`` (uncached, ours O=1/O=2, ideal; compile
time reported apart), then every other attention backend that runs here (flash-attn, xformers). Each
variant runs in its own try/except (its error goes into the table); a time budget skips what would not
fit instead of overrunning. Prints one table with the GPU's name and writes ``bench_gpu.json`` and
``bench_gpu.md`` into ``--out`` as it goes.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from .benchmark import (
    Row,
    format_table,
    rows_to_dicts,
    run_family,
    standard_variants,
    write_json_atomic,
    write_text_atomic,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} (torch {torch.__version__}, dry run)"


def plan(family, backends: list[str], compile_models: set[str], orders=(1, 2)):
    """The variants of one model, in the order they run."""
    out = standard_variants(family, orders=orders)
    if family.name in compile_models:
        out += standard_variants(family, orders=orders, diffusers=False, compiled=True)
    for backend in backends:
        if backend != "sdpa":
            out += [v for v in standard_variants(family, orders=(1,), diffusers=False, attention=backend)
                    if not v.name.startswith("ideal")]
    return out


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for bench_gpu.json and bench_gpu.md")
    parser.add_argument("--models", nargs="+", default=["dit", "flux", "hunyuan_video"])
    parser.add_argument("--compile-models", nargs="*", default=None,
                        help="models also timed with taylorseer.compile (default: all of --models)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip variants that would end after this")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, 8 steps: every code path")
    args = parser.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise SystemExit("bench_gpu needs diffusers (pip install diffusers, or a wheel: pip install --no-deps "
                         "diffusers-*.whl); nothing else beyond torch") from None
    from taylorseer.perf.attention import available_backends

    from .bench_families import FAMILIES

    start = time.time()
    if args.dry_run:
        device, dtype, size, steps = torch.device("cpu"), torch.float32, "smoke", 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on a CPU")
        device, dtype, size, steps = torch.device("cuda"), torch.bfloat16, "full", args.steps
    deadline = start + args.budget_s
    name = device_name(device)
    backends = available_backends(device, dtype)
    compile_models = set(args.models if args.compile_models is None else args.compile_models)
    print(f"# {name}; attention backends here: {', '.join(backends)}; budget {args.budget_s:.0f} s", flush=True)
    rows: list[Row] = []
    setup = dict(device=name, dtype=str(dtype), size=size, steps=steps, backends=backends,
                 models={m: FAMILIES[m].describe.get(size, "") for m in args.models})

    def save():
        kind = str(dtype).replace('torch.', '')
        title = (f"{name}, {steps} steps, {kind} random weights, one timed run per variant: "
                 + "; ".join(f"{k}: {v}" for k, v in setup["models"].items()))
        table = format_table(rows, title)
        write_json_atomic(f"{args.out}/bench_gpu.json", dict(setup=setup, elapsed_s=time.time() - start,
                                                             rows=rows_to_dicts(rows)))
        write_text_atomic(f"{args.out}/bench_gpu.md", table + "\n")
        return table

    for model in args.models:
        family = FAMILIES[model]
        if time.time() > deadline:
            rows.append(Row(model, "all", error="skipped: time budget"))
            continue
        try:
            rows += run_family(family, plan(family, backends, compile_models), size=size, device=device, dtype=dtype,
                               steps=steps, rounds=1, deadline=deadline,
                               log=lambda line: print(f"{time.time() - start:6.0f}s {line}", flush=True))
        except Exception as error:  # the model itself failed to build (memory, a diffusers version)
            rows.append(Row(model, "all", error=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"))
            print(f"[{model}] FAILED: {rows[-1].error}", flush=True)
        save()
    table = save()
    print(table, flush=True)
    print(f"# total {time.time() - start:.0f} s; written to {args.out}/bench_gpu.json and bench_gpu.md", flush=True)
    return rows


if __name__ == "__main__":
    main()
