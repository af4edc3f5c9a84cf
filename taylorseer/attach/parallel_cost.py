"""What context parallelism costs, computed from the models' shapes: per-rank memory and bytes moved per step.

    python -m taylorseer.attach.parallel_cost                  # the table of docs/context_parallel.md (markdown)
    python -m taylorseer.attach.parallel_cost --json           # the same numbers as JSON

For FLUX.1-dev at 1024x1024 and HunyuanVideo at 480x640x65 and 720x1280x129, bf16, K = 1, 2, 4, 8 Ulysses ranks:

* **factor bytes per rank**: the cache attached to the full-size transformer on the ``meta`` device (real configs, no
  weights; :func:`taylorseer.attach.hooks.count_cache_bytes`) with the app's default schedule, divided by K (each rank
  holds its own tokens' factors; the CPU tests check the 1/K on tiny models);
* **activations per rank**: the residual stream ``S/K x hidden`` and one block's working set
  ``S/K x hidden x (3 q,k,v + 1 attention out + mlp_ratio MLP + 1 residual)``, S = image/video + text tokens;
* **bytes sent per rank per computed step**: Ulysses runs four all-to-alls per attention layer (q, k, v before
  attention, its output after), each sending ``(K-1)/K`` of the rank's ``S/K x hidden`` tensor, plus the output
  all-gather after ``proj_out``; forecast steps run no attention (nothing moves; the adaptive schedule's probe moves
  one layer's worth and 16 bytes of error sums);
* **what is left of the speedup**: step time ``T1/K + bytes/bandwidth`` (no overlap of compute and transfer: a lower
  bound), T1 from the FLOPs of a step (linear layers ``2 x params x tokens``, attention ``4 x S^2 x hidden``) at the
  throughput upstream's own HunyuanVideo 720x1280x129 run achieved on one GPU (1904 s for 50 steps, upstream
  TaylorSeer's xDiT table),
  and ``--bandwidth`` GB/s per GPU per direction (450: NVLink 4, H100 SXM; the all-to-all's achieved bandwidth is
  lower, so these are upper bounds on the speedup). The cache multiplies it: forecast steps cost no transfer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from ..core.config import CacheConfig
from .hooks import apply, count_cache_bytes

BF16 = 2
# black-forest-labs/FLUX.1-dev transformer/config.json; hunyuanvideo-community/HunyuanVideo transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
HUNYUAN_VIDEO = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                     num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                     qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                     rope_theta=256.0, rope_axes_dim=(16, 56, 56))
# Upstream HunyuanVideo 720x1280x129, 50 steps on one GPU (upstream TaylorSeer's xDiT table): the throughput assumed.
UPSTREAM_SECONDS_PER_STEP = 1904 / 50


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    image_tokens: int
    text_tokens: int
    latent: tuple  # the transformer's input shape (B=1)
    cache: CacheConfig  # the app's default schedule (configs/cache/*.yaml)


def cases() -> list[Case]:
    flux = CacheConfig(interval=6, max_order=1, first_enhance=3)
    hv = CacheConfig(interval=5, max_order=1, first_enhance=1)

    def video(h, w, f):
        frames = (f - 1) // 4 + 1
        return Case(f"HunyuanVideo {h}x{w}x{f}", "hunyuan_video", frames * (h // 16) * (w // 16), 256,
                    (1, 16, frames, h // 8, w // 8), hv)

    return [Case("FLUX.1-dev 1024x1024", "flux", (1024 // 16) ** 2, 512, (1, (1024 // 16) ** 2, 64), flux),
            video(480, 640, 65), video(720, 1280, 129)]


def _model(case: Case):
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel

    cls, config = ((FluxTransformer2DModel, FLUX_DEV) if case.family == "flux"
                   else (HunyuanVideoTransformer3DModel, HUNYUAN_VIDEO))
    with torch.device("meta"):
        return cls(**config).to(torch.bfloat16).eval()


def _call(case: Case, model) -> dict:
    meta = dict(device="meta", dtype=torch.bfloat16)
    t = torch.ones(1, **meta)
    if case.family == "flux":
        return dict(hidden_states=torch.empty(*case.latent, **meta), timestep=t,
                    encoder_hidden_states=torch.empty(1, case.text_tokens, 4096, **meta),
                    pooled_projections=torch.empty(1, 768, **meta), img_ids=torch.empty(case.image_tokens, 3, **meta),
                    txt_ids=torch.empty(case.text_tokens, 3, **meta), guidance=t, return_dict=False)
    return dict(hidden_states=torch.empty(*case.latent, **meta), timestep=t,
                encoder_hidden_states=torch.empty(1, case.text_tokens, 4096, **meta),
                encoder_attention_mask=torch.ones(1, case.text_tokens, **meta),
                pooled_projections=torch.empty(1, 768, **meta), guidance=t, return_dict=False)


def factor_bytes(case: Case) -> int:
    """One process's cache at its fullest (every order filled), counted on the meta device."""
    model = _model(case)
    # the preset found from the class, as the apps use it (HunyuanVideo: the lean form, video tokens only)
    return count_cache_bytes(model, lambda c: apply(model, c), lambda: model(**_call(case, model)), case.cache)


def shapes(case: Case) -> dict:
    config = FLUX_DEV if case.family == "flux" else HUNYUAN_VIDEO
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return dict(hidden=hidden, heads=config["num_attention_heads"], double=config["num_layers"],
                single=config["num_single_layers"], mlp_ratio=config.get("mlp_ratio", 4.0),
                out_channels=64)  # FLUX: 16 latent channels x 2x2 packing; HunyuanVideo: 16 x 1x2x2 patches


def step_flops(case: Case) -> float:
    """FLOPs of one computed step (linear layers and attention; embedders and norms are < 1%)."""
    s = shapes(case)
    h, r, tokens = s["hidden"], s["mlp_ratio"], case.image_tokens + case.text_tokens
    per_token = 2 * (4 * h * h + 2 * r * h * h)  # q, k, v, out + MLP up/down, 2 FLOPs per multiply-add
    single_per_token = 2 * (3 * h * h + r * h * h + (1 + r) * h * h)  # qkv + MLP up + proj_out of [attn, mlp]
    attention = 4 * tokens * tokens * h
    return (s["double"] * (per_token * tokens + attention) + s["single"] * (single_per_token * tokens + attention))


def row(case: Case, k: int, factors: int, bandwidth_gbs: float, throughput: float) -> dict:
    s = shapes(case)
    tokens = case.image_tokens + case.text_tokens
    local = tokens // k
    layers = s["double"] + s["single"]
    a2a = 4 * layers * (k - 1) / k * local * s["hidden"] * BF16  # bytes a rank sends per step
    gather = (k - 1) / k * case.image_tokens * s["out_channels"] * BF16
    sent = a2a + gather if k > 1 else 0.0
    t1 = step_flops(case) / throughput
    tk = t1 / k + sent / (bandwidth_gbs * 1e9)
    return dict(case=case.name, K=k, tokens=tokens, heads_ok=s["heads"] % k == 0 and tokens % k == 0,
                factor_bytes_per_rank=factors // k,
                residual_bytes_per_rank=local * s["hidden"] * BF16,
                block_bytes_per_rank=int(local * s["hidden"] * (5 + s["mlp_ratio"]) * BF16),
                sent_bytes_per_step=int(sent), step_s_one=t1, step_s=tk, speedup=t1 / tk,
                comm_share=(sent / (bandwidth_gbs * 1e9)) / tk)


def table(degrees=(1, 2, 4, 8), bandwidth_gbs: float = 450.0) -> list[dict]:
    all_cases = cases()
    hv720 = all_cases[2]
    throughput = step_flops(hv720) / UPSTREAM_SECONDS_PER_STEP  # FLOP/s upstream achieved on one GPU
    rows = []
    for case in all_cases:
        factors = factor_bytes(case)
        rows += [row(case, k, factors, bandwidth_gbs, throughput) for k in degrees]
    return rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| case | K | factors/rank GiB | residual/rank GiB | block working set/rank GiB | sent/rank/step GiB | "
             "step s (1 GPU -> K) | speedup (no overlap) | transfer share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['K']} | {_gib(r['factor_bytes_per_rank'])} | "
                     f"{_gib(r['residual_bytes_per_rank'])} | {_gib(r['block_bytes_per_rank'])} | "
                     f"{_gib(r['sent_bytes_per_step'])} | {r['step_s_one']:.2f} -> {r['step_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {100 * r['comm_share']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=450.0, help="GB/s per GPU per direction (NVLink 4: 450)")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = table(tuple(args.degrees), args.bandwidth)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
