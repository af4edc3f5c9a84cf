"""One torchrun rank of the context-parallel tests (tests/test_context_parallel.py): tiny FLUX, HunyuanVideo and Wan
transformers sampled for a few steps in one process, then split over this rank's generation (``--ulysses`` ranks;
the world may hold several generations: data parallel x context parallel), with the cache off and on. Rank 0 writes
every rank's max difference to the one-process output, cache bytes and full/forecast decisions as JSON."""

import argparse
import json
import sys

import torch
import torch.distributed as dist

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import families, parallel

STEPS = 8
CONFIGS = {
    "off": None,
    "interval-O0": CacheConfig(interval=3, max_order=0, first_enhance=2),
    "interval-O1": CacheConfig(interval=3, max_order=1, first_enhance=2),
    "interval-O2": CacheConfig(interval=3, max_order=2, first_enhance=2),
    "adaptive-O1": CacheConfig(schedule="adaptive", interval=4, max_order=1, first_enhance=2, threshold=0.05),
}


def case(family: str, heads: int, seed: int):
    config = {**families.config_of(family, "smoke"), "num_attention_heads": heads}
    torch.manual_seed(0)  # the same weights on every rank and in every generation
    model = getattr(__import__("diffusers"), families.class_name(family))(**config).eval()
    frames, height, width, text = families._SHAPES[family]["smoke"]
    inputs = families.inputs(family, model, frames=frames, height=height, width=width, text_tokens=text,
                             seed=seed)
    if family == "hunyuan_video":  # a padded prompt: the last 3 text tokens are masked out
        inputs["encoder_attention_mask"][:, -3:] = 0
    return model, inputs


def sample(model, inputs, config):
    if config is not None:
        taylorseer.apply(model, config, num_steps=STEPS)
    latent, t0 = inputs["hidden_states"].clone(), inputs["timestep"]
    with torch.no_grad():
        for i in range(STEPS):
            out = model(**{**inputs, "hidden_states": latent, "timestep": t0 * (1 - i / STEPS)})[0]
            latent = latent - out / STEPS
    cache = taylorseer.get_cache(model)
    result = dict(nbytes=cache.nbytes() if cache else 0, full=[r.full for r in cache.history] if cache else None)
    if cache is not None:
        taylorseer.remove(model)
    return latent, result


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--ulysses", type=int, required=True)
    parser.add_argument("--families", default="flux,hunyuan_video,wan")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    layout = parallel.Layout(dist.get_rank(), dist.get_world_size(), args.ulysses)
    rows = []
    for family in args.families.split(","):
        heads = max(2, args.ulysses)
        model, inputs = case(family, heads, seed=1 + layout.group)  # each generation its own inputs
        reference = {name: sample(model, inputs, CONFIGS[name]) for name in args.configs.split(",")}
        parallel.enable(model, ulysses=args.ulysses)
        for name in args.configs.split(","):
            latent, result = sample(model, inputs, CONFIGS[name])
            ref_latent, ref_result = reference[name]
            rows.append(dict(family=family, config=name, rank=layout.rank, group=layout.group,
                             max_diff=float((latent - ref_latent).abs().max()),
                             scale=float(ref_latent.abs().max()), nbytes=result["nbytes"],
                             nbytes_one=ref_result["nbytes"], full=result["full"], full_one=ref_result["full"],
                             sum=float(latent.double().sum())))
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.barrier()  # no rank tears its groups down while rank 0 still receives the gather
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
