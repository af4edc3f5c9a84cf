"""Calibrate a DiT sampler for ``cache.schedule=calibrated`` (see :mod:`taylorseer.core.calibration`).

    bash scripts/calibrate.sh dit model=digits num_steps=50 cfg_scale=2.0
    bash scripts/sample_dit.sh model=digits cfg_scale=2.0 cache.schedule=calibrated cache.budget=10 \\
        cache.calibration=runs/calibrations/dit-DiT-Digits-ddim50-cfg2-seed1.json

Two uncached sampling runs of ``samples`` samples (sample ``i``: class and noise as ``sample_dit_ddp`` makes
index ``i`` of seed ``seed``): the first records the cached modules' trajectory sketch, the second perturbs
sample ``i`` at step ``i mod num_steps`` to measure each step's sensitivity. Their FLOPs are in the file.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taylorseer import CacheConfig
from taylorseer.harness import calibrate, distributed, runs
from taylorseer.harness.settings import Setting

from .cache import cached_module_names
from .diffusion import GaussianDiffusion
from .flops import count_flops
from .pipeline import load_model, sample, sample_seed, to_images
from .sample import CONFIG_DIR, SAMPLING_SCHEMA, validate, weights_identity
from .sample_ddp import class_label

TAG = "calibrate_dit"
CONFIG_NAME = "calibrate_dit"
SCHEMA = {**SAMPLING_SCHEMA, "class_labels": Setting("list"), "compare_uncached": Setting("bool"),
          "grid_nrow": Setting("int", minimum=1), **calibrate.SETTINGS}


def out_path(cfg: DictConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    spacing = "" if cfg.spacing == "even" else f"-{cfg.spacing}spaced"
    name = (f"dit-{cfg.model.name.replace('/', '-')}-{cfg.sampler}{cfg.num_steps}{spacing}-cfg{cfg.cfg_scale:g}"
            f"-seed{cfg.seed}.json")
    return Path(cfg.out_root) / "calibrations" / name


def main(cfg: DictConfig) -> Path:
    validate(cfg, SCHEMA, TAG, check_labels=False)
    calibrate.check_samples(cfg.samples, cfg.num_steps)
    device = distributed.select_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out = out_path(cfg)
    model, vae = load_model(cfg, device, dtype)
    diffusion = GaussianDiffusion(cfg.num_steps, cfg.sampler, spacing=cfg.spacing)
    recorder = calibrate.Recorder(model, cached_module_names(model), cfg.num_steps, cfg.samples,
                                  sketch_size=cfg.sketch_size, epsilon=cfg.epsilon, seed=cfg.seed,
                                  timestep_fn=lambda args, kwargs: args[1])
    reference, perturbed = [], []
    starts = range(0, cfg.samples, cfg.batch_size)
    for start in tqdm(starts, disable=not cfg.progress or len(starts) < 2, desc="calibration batches"):
        index = list(range(start, min(start + cfg.batch_size, cfg.samples)))
        seeds = [sample_seed(cfg.seed, i) for i in index]
        labels = torch.tensor([class_label(cfg.seed, i, cfg.model.num_classes) for i in index])
        for mode, outputs in (("record", reference), ("perturb", perturbed)):
            with recorder.attached(mode, offset=start, batch=len(index)):
                outputs.append(to_images(sample(model, diffusion, labels, cfg.cfg_scale, seeds), vae).cpu())
    flops = count_flops(model, CacheConfig(enabled=False), cfg.num_steps, cfg.cfg_scale)
    settings_used = calibrate.app_settings(OmegaConf.to_container(cfg, resolve=True))
    made_for = calibrate.dit_target(settings_used, weights_identity(cfg)["resolved.checkpoint"])
    calibrate.write_and_report(TAG, out, recorder, reference, perturbed, flops.flops_uncached, "dit", settings_used,
                               made_for, "samples")
    return out


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
