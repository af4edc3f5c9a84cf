"""Calibrate a FLUX sampler for ``cache.schedule=calibrated`` (see :mod:`taylorseer.core.calibration`).

    bash scripts/calibrate.sh flux model=digits_flux
    bash scripts/sample_flux.sh model=digits_flux cache.schedule=calibrated cache.budget=10 \\
        cache.calibration=runs/calibrations/flux-flux-digits-50steps-16x16-seed1.json

Two uncached runs of ``samples`` images (image ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``): the
first records the cached modules' trajectory sketch, the second perturbs image ``i`` at step ``i mod num_steps``
to measure each step's sensitivity. Their FLOPs are in the file.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taylorseer import CacheConfig
from taylorseer.harness import calibrate, distributed, runs, settings

from . import sample as sample_app
from .cache import cached_module_names
from .pipeline import generate, load_flux

TAG = "calibrate_flux"
CONFIG_NAME = "calibrate_flux"


def out_path(cfg: DictConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = f"flux-{cfg.model.short_name}-{cfg.num_steps}steps-{cfg.height}x{cfg.width}-seed{cfg.seed}.json"
    return Path(cfg.out_root) / "calibrations" / name


def main(cfg: DictConfig) -> Path:
    # the model's family first: a DiT model config has no model.path to resolve
    settings.check_model_family(OmegaConf.to_container(cfg.model, resolve=True), "flux", TAG, sample_app.CONFIG_DIR)
    sample_app.resolve_model_path(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.pop_settings(plain)  # the rest is sample_flux's settings, checked by its own schema
    _, prompts = sample_app.validate(OmegaConf.create(plain))
    calibrate.check_samples(cfg.samples, cfg.num_steps)
    device = distributed.select_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out = out_path(cfg)
    pipe = load_flux(cfg.model.path, pipeline=cfg.model.pipeline, dtype=dtype, device=device,
                     cpu_offload=cfg.cpu_offload, vae_tiling=cfg.vae_tiling, vae_slicing=cfg.vae_slicing)
    recorder = calibrate.Recorder(pipe.transformer, cached_module_names(pipe.transformer), cfg.num_steps, cfg.samples,
                                    sketch_size=cfg.sketch_size, epsilon=cfg.epsilon, seed=cfg.seed,
                                    calls_per_step=2 if cfg.true_cfg_scale > 1 else 1,
                                    timestep_fn=lambda args, kwargs: kwargs.get("timestep"))
    call = dict(num_steps=cfg.num_steps, height=cfg.height, width=cfg.width, guidance_scale=cfg.guidance_scale,
                true_cfg_scale=cfg.true_cfg_scale, negative_prompt=cfg.negative_prompt,
                max_sequence_length=cfg.max_sequence_length, device=device, output_type="pt")
    reference, perturbed = [], []
    starts = range(0, cfg.samples, cfg.batch_size)
    for start in tqdm(starts, disable=not cfg.progress or len(starts) < 2, desc="calibration batches"):
        index = list(range(start, min(start + cfg.batch_size, cfg.samples)))
        batch_prompts = [prompts[i % len(prompts)] for i in index]
        seeds = [cfg.seed + i for i in index]
        for mode, outputs in (("record", reference), ("perturb", perturbed)):
            with recorder.attached(mode, offset=start, batch=len(index)):
                images = generate(pipe, batch_prompts, seeds, **call).images
            outputs.append(torch.stack([torch.as_tensor(im) for im in images]).float().cpu())
    config, vae_scale = dict(pipe.transformer.config), pipe.vae_scale_factor
    flops = sample_app.count_flops(cfg, CacheConfig(enabled=False), config, vae_scale, {})
    settings_used = calibrate.app_settings(plain)
    made_for = calibrate.pipeline_made_for("flux", settings_used, cfg.model.path)
    calibrate.write_and_report(TAG, out, recorder, reference, perturbed, flops.flops_uncached, "flux", settings_used,
                               made_for, "images")
    return out


@hydra.main(config_path=sample_app.CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
