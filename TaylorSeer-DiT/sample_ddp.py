"""Many samples for FID, data-parallel over ranks (torchrun), resumable, packed into an ADM ``.npz``.

    torchrun --nproc_per_node 8 -m taylorseer_dit.sample_ddp num_samples=50000 cache.interval=4
    bash scripts/sample_dit_ddp.sh num_samples=50000            # the same, one process per GPU

Every rank samples its share of each global batch: batch g holds indices [g*G, (g+1)*G) with
G = per-rank batch x world size, rank r the slice [g*G + r*B, g*G + (r+1)*B). The count is rounded
up to a multiple of G (as DiT does) and the first ``num_samples`` PNGs are packed. Rank r seeds its
stream with seed*world_size + r (DiT's rule); each batch draws from a generator seeded with that
and the batch index, so a rerun after a kill regenerates exactly the missing PNGs, identically.
Finished batches are skipped; each PNG is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from taylorseer import runs

from .diffusion import GaussianDiffusion
from .sample import CONFIG_DIR, load_model, run_name, validate
from .sampling import attach_cache, count_flops, sample, to_images


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); a plain ``python -m`` run is a world of one."""
    if "RANK" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def batch_indices(batch: int, rank: int, world: int, per_rank: int) -> list[int]:
    start = batch * per_rank * world + rank * per_rank
    return list(range(start, start + per_rank))


def batch_seed(seed: int, rank: int, world: int, batch: int) -> int:
    return (seed * world + rank) * 1_000_003 + batch


def pack_npz(sample_dir: Path, num_samples: int, out_path: Path) -> Path:
    """``arr_0``: uint8 (N, H, W, 3), the layout the ADM evaluation suite reads."""
    images = []
    for i in tqdm(range(num_samples), desc="packing npz"):
        img = np.asarray(Image.open(sample_dir / f"{i:06d}.png").convert("RGB"), dtype=np.uint8)
        images.append(img)
    arr = np.stack(images)
    runs.atomic_write(out_path, lambda p: np.savez(p, arr_0=arr))
    return out_path


def main(cfg: DictConfig) -> Path:
    cache_config = validate(cfg, check_labels=False)  # labels are drawn at random
    assert cfg.num_samples >= 1, f"num_samples={cfg.num_samples} must be >= 1"
    rank, world = setup_distributed()
    device = runs.resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_root) / "dit_fid" / run_name(cfg, cache_config)
    sample_dir = out_dir / "samples"
    per_rank = cfg.batch_size
    global_batch = per_rank * world
    num_batches = math.ceil(cfg.num_samples / global_batch)

    model, vae = load_model(cfg, device, dtype)
    diffusion = GaussianDiffusion(cfg.num_steps, cfg.sampler)
    attach_cache(model, cache_config, cfg.num_steps)
    if rank == 0:
        print(f"[sample_ddp] {cfg.num_samples} samples ({num_batches * global_batch} with rounding) on {world} "
              f"rank(s) -> {sample_dir}")
    flops = count_flops(model, cache_config, cfg.num_steps, cfg.cfg_scale)

    timing, made = {"seconds": 0.0}, 0
    for b in tqdm(range(num_batches), disable=rank != 0 or not cfg.progress, desc="batches"):
        indices = batch_indices(b, rank, world, per_rank)
        missing = [i for i in indices if not (sample_dir / f"{i:06d}.png").exists()]
        if not missing:
            continue  # finished before a kill: skip
        gen = torch.Generator().manual_seed(batch_seed(cfg.seed, rank, world, b))
        labels = torch.randint(0, cfg.model.num_classes, (per_rank,), generator=gen)
        part: dict = {}
        with runs.timed(part, device=device):
            z = sample(model, diffusion, labels, cfg.cfg_scale, seed=int(torch.randint(2**62, (1,), generator=gen)))
            images = to_images(z, vae).cpu()
        timing["seconds"] += part["seconds"]
        for i, img in zip(indices, images, strict=True):
            if i in missing:
                array = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                runs.save_image(sample_dir / f"{i:06d}.png", Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1
                                                                             else array))
                made += 1

    if world > 1:
        dist.barrier()
    npz = out_dir / f"samples_{cfg.num_samples}.npz"
    if rank == 0:
        pack_npz(sample_dir, cfg.num_samples, npz)
        metrics = runs.sampling_metrics(cache_config, flops, made, timing["seconds"], 0, device,
                                        num_samples=cfg.num_samples, world_size=world, npz=str(npz))
        runs.write_metrics(out_dir, metrics)
        runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        print(f"[sample_ddp] wrote {npz} (made {made} new samples on rank 0)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return npz


@hydra.main(config_path=CONFIG_DIR, config_name="sample_dit_ddp", version_base=None)
@runs.clear_errors("sample_dit_ddp", also=(AssertionError,))  # the scripts assert their arguments with messages
def _cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    _cli()
