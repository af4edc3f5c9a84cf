"""Sample DiT with TaylorSeer: class labels -> a PNG grid, per-image PNGs and metrics.json.

    bash scripts/sample_dit.sh                                  # DiT-XL/2 256, N=3, O=3, DDIM-50, cfg 1.5
    bash scripts/sample_dit.sh cache.interval=5 cache.max_order=2 compare_uncached=true
    bash scripts/sample_dit.sh model=digits cache=none          # the bundled digits model, no cache

The run folder ``${out_root}/dit/<model>-<cache tag>-<sampler><steps>-cfg<scale>-seed<seed>`` (or
``run_name``) gets the images, config.yaml, run.json (the settings that made them, checked on resume) and
metrics.json (latency per image, FLOPs computed/total, compression, cache bytes, peak memory; with
compare_uncached also the wall speedup and PSNR/SSIM). Image ``i`` is class ``class_labels[i]`` from the
noise of seed ``(seed << 32) + i``, whatever the batch size; a rerun makes only the images that are missing.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torchvision.utils import make_grid
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig
from taylorseer.harness import calibrate, distributed, runfolder, runs, settings
from taylorseer.harness.settings import Setting
from taylorseer_eval.fidelity import finite_mean, psnr, ssim

from .cache import attach_cache
from .diffusion import SPACINGS, GaussianDiffusion
from .flops import count_flops
from .models import DiT_models
from .pipeline import find_checkpoint, load_dit, load_model, read_architecture, sample, sample_seed, to_images, warm_up

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
TAG = "sample_dit"
CONFIG_NAME = "sample_dit"  # configs/sample_dit.yaml

# The model group (configs/model/*.yaml with family: dit) and the keys both DiT apps share.
MODEL_SCHEMA = {
    "model.family": Setting("str"),
    "model.name": Setting("str"),
    "model.image_size": Setting("int", minimum=8, multiple_of=8),
    "model.num_classes": Setting("int", minimum=1),
    "model.in_channels": Setting("int", minimum=1),
    "model.checkpoint": Setting("str", nullable=True),
    "model.ckpt_dir": Setting("str", nullable=True),
    "model.vae": Setting("str", nullable=True),
    "model.latent": Setting("bool"),
    "model.class_labels": Setting("list"),
}
SAMPLING_SCHEMA = {
    **MODEL_SCHEMA,
    "num_steps": Setting("int", minimum=1),
    "sampler": Setting("str", choices=("ddim", "ddpm")),
    "spacing": Setting("str", choices=SPACINGS),
    "cfg_scale": Setting("float", minimum=1.0, hint="1 turns guidance off"),
    "batch_size": Setting("int", minimum=1),
    "attention_backend": Setting("str", choices=("sdpa", "flash", "xformers")),
    "compile": Setting("bool"),
    "warmup": Setting("bool"),
}
SCHEMA = {
    **SAMPLING_SCHEMA,
    "class_labels": Setting("list"),
    "compare_uncached": Setting("bool"),
    "grid_nrow": Setting("int", minimum=1),
}


def run_name(cfg: DictConfig, cache_config: CacheConfig) -> str:
    model = cfg.model.name.replace("/", "-")
    size = f"-{cfg.model.image_size}" if cfg.model.latent else ""
    spacing = "" if cfg.spacing == "even" else f"-{cfg.spacing}spaced"
    return (f"{model}{size}-{cache_config.tag}-{cfg.sampler}{cfg.num_steps}{spacing}-cfg{cfg.cfg_scale:g}"
            f"-seed{cfg.seed}")


def validate(cfg: DictConfig, schema: dict = SCHEMA, app: str = TAG, check_labels: bool = True) -> CacheConfig:
    """Everything that can be checked before a model is loaded: keys, types, ranges, the model's family."""
    plain, cache_config = settings.check_app(cfg, schema, app, "dit", CONFIG_DIR)
    if check_labels:
        labels = plain["class_labels"]
        if not labels:
            raise ValueError("class_labels is empty: give at least one class index, e.g. class_labels=[207,360]")
        bad = [y for y in labels if isinstance(y, bool) or not isinstance(y, int)
               or not 0 <= y < cfg.model.num_classes]
        if bad:
            raise ValueError(f"class_labels {bad} are not class indices in [0, {cfg.model.num_classes})")
    return cache_config


def weights_identity(cfg: DictConfig) -> dict:
    """Fingerprints of the checkpoint (and of a local VAE folder), without loading them; a missing
    checkpoint fails here with where it was looked for."""
    path = find_checkpoint(cfg.model.checkpoint, cfg.model.name, cfg.model.image_size, cfg.model.ckpt_dir)
    weights = {"resolved.checkpoint": runfolder.file_fingerprint(path)}
    meta = path.with_suffix(".json")
    if meta.is_file():  # a checkpoint trained here: its architecture is part of the model (checked now)
        weights["resolved.architecture"] = runfolder.digest(read_architecture(meta))
    elif cfg.model.name not in DiT_models:
        load_dit(path, cfg.model.name)  # fails with the missing file named, before anything else
    if cfg.model.latent and Path(str(cfg.model.vae)).expanduser().is_dir():
        weights["resolved.vae"] = runfolder.folder_fingerprint(Path(str(cfg.model.vae)).expanduser())
    return weights


def enable_cache(model, cache_config: CacheConfig, cfg: DictConfig):
    """The cache on ``model``, then (``compile=true``) the regional compile, which must come after it."""
    cache = attach_cache(model, cache_config, cfg.num_steps)
    if cfg.compile:
        taylorseer.compile(model)
    return cache


def detach(model) -> None:
    taylorseer.uncompile(model)
    taylorseer.remove(model)


def run_identity(cfg: DictConfig, device: torch.device, dtype: torch.dtype, weights: dict,
                 ignore: tuple[str, ...] = ("grid_nrow",)) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True)
    resolved = {"resolved.device": device.type, "resolved.dtype": str(dtype).replace("torch.", ""), **weights}
    resolved.update(calibrate.check_run(plain, calibrate.dit_target(plain, weights.get("resolved.checkpoint"))))
    return runfolder.identity(plain, resolved, ignore)


def check_config(cfg: DictConfig) -> None:
    """What a sweep checks for each point before it launches anything: every setting and the calibration's
    match (the weights may live only where the jobs run: they are found and fingerprinted by the run itself)."""
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.check_run(plain, calibrate.dit_target(plain, None))


def run_dir(cfg: DictConfig) -> Path:
    """Where this app writes a run of ``cfg`` (the sweep harness asks every app the same question): the
    settings' name and, so that two label lists never share a default folder, a digest of the labels."""
    cache_config = CacheConfig.from_dict(OmegaConf.to_container(cfg.cache, resolve=True))
    labels = [int(y) for y in cfg.class_labels]
    name = f"{run_name(cfg, cache_config)}-{len(labels)}labels-{runfolder.digest(labels)[:6]}"
    return Path(cfg.out_root) / "dit" / (cfg.run_name or name)


def main(cfg: DictConfig) -> dict:
    cache_config = validate(cfg)
    device = distributed.select_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = run_dir(cfg)
    weights = weights_identity(cfg)
    runfolder.check_identity(out_dir, run_identity(cfg, device, dtype, weights))  # before the (long) load
    model, vae = load_model(cfg, device, dtype)
    diffusion = GaussianDiffusion(cfg.num_steps, cfg.sampler, spacing=cfg.spacing)
    labels = [int(y) for y in cfg.class_labels]
    compare = bool(cfg.compare_uncached and cache_config.enabled)
    names = [f"{i:04d}-class{y}.png" for i, y in enumerate(labels)]

    with runfolder.RunFolder.open(out_dir, run_identity(cfg, device, dtype, weights)):
        runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        records = runfolder.Records(out_dir)
        done = records.done(lambda r: [r["file"]] + ([f"uncached/{r['file']}"] if "psnr" in r else []))
        done = {i: r for i, r in done.items() if i < len(names) and r["file"] == names[i]
                and (not compare or "psnr" in r)}
        todo = [i for i in range(len(labels)) if i not in done]
        enable_cache(model, cache_config, cfg)
        flops = count_flops(model, cache_config, cfg.num_steps, cfg.cfg_scale)
        if todo and cfg.warmup:
            warm_up(model, diffusion, cfg.cfg_scale, min(len(todo), cfg.batch_size))
        runs.reset_peak_memory(device)
        batches = [todo[k:k + cfg.batch_size] for k in range(0, len(todo), cfg.batch_size)]
        for batch in tqdm(batches, disable=not cfg.progress or len(batches) < 2, desc="batches"):
            seeds = [sample_seed(cfg.seed, i) for i in batch]
            y = torch.tensor([labels[i] for i in batch])
            timing: dict = {}
            with runs.timed(timing, device=device):
                images = to_images(sample(model, diffusion, y, cfg.cfg_scale, seeds, progress=cfg.progress), vae).cpu()
            cache_bytes = taylorseer.get_cache(model).nbytes()
            computed = taylorseer.get_cache(model).full_step_count  # this call's (adaptive: data-dependent)
            new = {i: dict(index=i, label=labels[i], seed=seeds[k], file=names[i], cache_bytes=cache_bytes,
                           latency_s=timing["seconds"] / len(batch), full_steps=computed)
                   for k, i in enumerate(batch)}
            if compare:
                with _detached(model, cache_config, cfg):
                    with runs.timed(timing, "uncached", device=device):
                        reference = to_images(sample(model, diffusion, y, cfg.cfg_scale, seeds), vae).cpu()
                for k, i in enumerate(batch):
                    new[i].update(uncached_latency_s=timing["uncached"] / len(batch),
                                  psnr=finite_mean(psnr(images[k:k + 1], reference[k:k + 1])),
                                  ssim=float(ssim(images[k:k + 1], reference[k:k + 1]).mean()))
                    runs.save_image(out_dir / "uncached" / names[i], _to_pil(reference[k]))
            for k, i in enumerate(batch):
                runs.save_image(out_dir / names[i], _to_pil(images[k]))
                records.append(new[i])
                done[i] = new[i]
            runs.write_metrics(out_dir, _metrics(cfg, cache_config, flops, done, device, dtype))
        detach(model)
        _save_grid(out_dir, names, cfg.grid_nrow)
        if compare:
            _save_grid(out_dir / "uncached", names, cfg.grid_nrow)
        metrics = _metrics(cfg, cache_config, flops, done, device, dtype)
        runs.write_metrics(out_dir, metrics)
    print(f"[{TAG}] {len(todo)} new, {len(done)} images in {out_dir}")
    summary = runs.summary_line(TAG, cache_config.tag, metrics, cfg.num_steps)
    print(summary)
    return metrics


class _detached:
    """The model without its cache for a block (the uncached comparison), then the cache back."""

    def __init__(self, model, config: CacheConfig, cfg: DictConfig):
        self.model, self.config, self.cfg = model, config, cfg

    def __enter__(self):
        detach(self.model)

    def __exit__(self, *exc):
        enable_cache(self.model, self.config, self.cfg)


def _metrics(cfg: DictConfig, cache_config: CacheConfig, flops, done: dict, device, dtype) -> dict:
    extra = {"model": OmegaConf.to_container(cfg.model), "sampler": cfg.sampler, "spacing": cfg.spacing,
             "cfg_scale": cfg.cfg_scale, "seed": cfg.seed, "run_device": str(device),
             "dtype": str(dtype).replace("torch.", "")}
    return runs.sampling_metrics(cache_config, flops, [done[i] for i in sorted(done)], device, **extra)


def _to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img * 255).round().to(torch.uint8).permute(1, 2, 0).squeeze(-1).numpy())


def _save_grid(folder: Path, names: list[str], nrow: int) -> None:
    """The grid of every image of the run, read back from disk (a resumed run made only some of them)."""
    import numpy as np

    images = [torch.from_numpy(np.asarray(Image.open(folder / n), dtype=np.float32) / 255) for n in names]
    images = [im.unsqueeze(0) if im.dim() == 2 else im.permute(2, 0, 1) for im in images]
    runs.save_image(folder / "grid.png", _to_pil(make_grid(torch.stack(images), nrow=nrow, padding=2,
                                                           pad_value=1.0)))


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG, also=(AssertionError,))  # the scripts assert their arguments with messages
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
