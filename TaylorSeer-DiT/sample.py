"""Sample DiT with TaylorSeer: class labels -> a PNG grid, per-image PNGs and metrics.json.

    bash scripts/sample_dit.sh                                  # DiT-XL/2 256, N=3, O=3, DDIM-50, cfg 1.5
    bash scripts/sample_dit.sh cache.interval=5 cache.max_order=2 compare_uncached=true
    bash scripts/sample_dit.sh model=digits cache=none          # the bundled digits model, no cache

The run folder ``${out_root}/dit/<model>-<cache tag>-<sampler><steps>-cfg<scale>-seed<seed>`` gets
the images, config.yaml and metrics.json (latency per image, FLOPs computed/total, compression,
cache bytes, peak memory; with compare_uncached also the wall speedup and PSNR/SSIM).
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig, runs
from taylorseer_eval.fidelity import finite_mean, psnr, ssim

from .checkpoints import find_checkpoint, load_dit, load_vae
from .diffusion import GaussianDiffusion
from .sampling import attach_cache, count_flops, sample, to_images

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def run_name(cfg: DictConfig, cache_config: CacheConfig) -> str:
    model = cfg.model.name.replace("/", "-")
    size = f"-{cfg.model.image_size}" if cfg.model.latent else ""
    return f"{model}{size}-{cache_config.tag}-{cfg.sampler}{cfg.num_steps}-cfg{cfg.cfg_scale:g}-seed{cfg.seed}"


def load_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype):
    path = find_checkpoint(cfg.model.checkpoint, cfg.model.name, cfg.model.image_size, cfg.model.ckpt_dir)
    model = load_dit(path, cfg.model.name, cfg.model.image_size, cfg.model.num_classes, cfg.model.in_channels,
                     cfg.model.latent).to(device=device, dtype=dtype)
    vae = load_vae(cfg.model.vae, dtype).to(device) if cfg.model.latent else None
    return model, vae


def validate(cfg: DictConfig, check_labels: bool = True) -> CacheConfig:
    """Everything that can be checked before a model is loaded."""
    cache_config = CacheConfig.from_dict(OmegaConf.to_container(cfg.cache, resolve=True))
    assert cfg.num_steps >= 1, f"num_steps={cfg.num_steps} must be >= 1"
    assert cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"
    assert cfg.cfg_scale >= 1.0, f"cfg_scale={cfg.cfg_scale} must be >= 1 (1 turns guidance off)"
    if not check_labels:
        return cache_config
    labels = list(cfg.class_labels)
    assert labels, "class_labels is empty: give at least one class index"
    bad = [y for y in labels if not 0 <= int(y) < cfg.model.num_classes]
    assert not bad, f"class_labels {bad} are outside [0, {cfg.model.num_classes})"
    return cache_config


def sample_all(model, diffusion, labels: list[int], cfg: DictConfig, vae, progress: bool) -> torch.Tensor:
    images = []
    batches = range(0, len(labels), cfg.batch_size)
    for start in tqdm(batches, disable=not progress or len(batches) == 1, desc="batches"):
        y = torch.tensor(labels[start:start + cfg.batch_size])
        z = sample(model, diffusion, y, cfg.cfg_scale, seed=cfg.seed + start, progress=progress)
        images.append(to_images(z, vae).cpu())
    return torch.cat(images)


def main(cfg: DictConfig) -> dict:
    cache_config = validate(cfg)
    device = runs.resolve_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_root) / "dit" / run_name(cfg, cache_config)
    model, vae = load_model(cfg, device, dtype)
    diffusion = GaussianDiffusion(cfg.num_steps, cfg.sampler)
    cache = attach_cache(model, cache_config, cfg.num_steps)
    labels = [int(y) for y in cfg.class_labels]

    flops = count_flops(model, cache_config, cfg.num_steps, cfg.cfg_scale)
    runs.reset_peak_memory(device)
    timing: dict = {}
    with runs.timed(timing, device=device):
        images = sample_all(model, diffusion, labels, cfg, vae, cfg.progress)
    cache_bytes = cache.nbytes()
    extra = {"model": OmegaConf.to_container(cfg.model), "sampler": cfg.sampler, "cfg_scale": cfg.cfg_scale,
             "seed": cfg.seed, "run_device": str(device), "dtype": str(dtype).replace("torch.", "")}

    if cfg.compare_uncached and cache_config.enabled:
        taylorseer.remove(model)
        with runs.timed(timing, "uncached_seconds", device=device):
            reference = sample_all(model, diffusion, labels, cfg, vae, cfg.progress)
        extra.update(uncached_latency_s=timing["uncached_seconds"] / len(labels),
                     wall_speedup=timing["uncached_seconds"] / timing["seconds"],
                     psnr_vs_uncached=finite_mean(psnr(images, reference)),
                     ssim_vs_uncached=float(ssim(images, reference).mean()))
        _save_images(out_dir / "uncached", reference, labels, cfg.grid_nrow)
    else:
        taylorseer.remove(model)

    _save_images(out_dir, images, labels, cfg.grid_nrow)
    metrics = runs.sampling_metrics(cache_config, flops, len(labels), timing["seconds"], cache_bytes, device, **extra)
    runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    runs.write_metrics(out_dir, metrics)
    print(f"[sample_dit] {len(labels)} images -> {out_dir}")
    print(f"[sample_dit] {cache_config.tag}: {metrics['full_steps']}/{metrics['num_steps']} full steps, "
          f"FLOPs compression {metrics['compression']:.2f}x, {metrics['latency_s']:.3f} s/image, "
          f"cache {cache_bytes / 2**20:.1f} MiB" + (f", wall speedup {extra['wall_speedup']:.2f}x, PSNR "
                                                    f"{extra['psnr_vs_uncached']:.2f} dB" if "wall_speedup" in extra
                                                    else ""))
    return metrics


def _save_images(out_dir: Path, images: torch.Tensor, labels: list[int], nrow: int) -> None:
    from PIL import Image

    def to_pil(img: torch.Tensor):
        array = (img * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy()
        return Image.fromarray(array)

    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        runs.save_image(out_dir / f"{i:04d}-class{y}.png", to_pil(img))
    runs.save_image(out_dir / "grid.png", to_pil(make_grid(images, nrow=nrow, padding=2, pad_value=1.0)))


@hydra.main(config_path=CONFIG_DIR, config_name="sample_dit", version_base=None)
@runs.clear_errors("sample_dit", also=(AssertionError,))  # the scripts assert their arguments with messages
def _cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    _cli()
