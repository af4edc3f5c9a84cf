"""Calibrate a HunyuanVideo sampler for ``cache.schedule=calibrated`` (see :mod:`taylorseer.core.calibration`).

    bash scripts/calibrate.sh hunyuan_video model.path=/data/HunyuanVideo num_frames=33 samples=100
    bash scripts/sample_hunyuan_video.sh cache.schedule=calibrated cache.budget=10 \\
        cache.calibration=runs/calibrations/hunyuan_video-50steps-480x640x33-seed1.json

Two uncached runs of ``samples`` videos (video ``i``: prompt ``i mod len(prompts)``, seed ``seed + i``): the
first records the cached modules' trajectory sketch, the second perturbs video ``i`` at step ``i mod num_steps``
to measure each step's sensitivity. Their FLOPs are in the file. The sampling settings are sample_hunyuan_video's
and must be those of the runs that use the file.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taylorseer import CacheConfig
from taylorseer.harness import calibrate, distributed, runs
from taylorseer.perf.attention import set_attention_backend

from . import sample as sample_app
from .cache import cached_module_names
from .flops import VideoShape, count_run_flops
from .pipeline import generate, load_hunyuan_video, place

TAG = "calibrate_hunyuan_video"
CONFIG_NAME = "calibrate_hunyuan_video"


def out_path(cfg: DictConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    name = f"hunyuan_video-{cfg.num_steps}steps-{cfg.height}x{cfg.width}x{cfg.num_frames}-seed{cfg.seed}.json"
    return Path(cfg.out_root) / "calibrations" / name


def main(cfg: DictConfig) -> Path:
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.pop_settings(plain)  # the rest is sample_hunyuan_video's settings, checked by its own schema
    _, prompts = sample_app.validate(OmegaConf.create(plain))
    calibrate.check_samples(cfg.samples, cfg.num_steps)
    device = distributed.select_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out = out_path(cfg)
    pipe = load_hunyuan_video(cfg.model.path, dtype=dtype, flow_shift=cfg.flow_shift, vae_tiling=cfg.vae_tiling)
    set_attention_backend(pipe.transformer, cfg.attention_backend)
    place(pipe, device, cfg.cpu_offload)
    pipe.set_progress_bar_config(disable=True)
    calls_per_step = 2 if cfg.true_cfg_scale > 1 else 1
    cached = cached_module_names(pipe.transformer, cfg.record_single_attention, cfg.cache.forecast_step)
    recorder = calibrate.Recorder(pipe.transformer, cached,
                                  cfg.num_steps, cfg.samples, sketch_size=cfg.sketch_size, epsilon=cfg.epsilon,
                                  seed=cfg.seed, calls_per_step=calls_per_step,
                                  timestep_fn=lambda args, kwargs: kwargs.get("timestep"))
    call = dict(num_steps=cfg.num_steps, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                guidance_scale=cfg.guidance_scale, true_cfg_scale=cfg.true_cfg_scale,
                negative_prompt=cfg.negative_prompt, max_sequence_length=cfg.max_sequence_length, device=device)
    reference, perturbed = [], []
    for i in tqdm(range(cfg.samples), disable=not cfg.progress, desc="calibration videos"):
        for mode, outputs in (("record", reference), ("perturb", perturbed)):
            with recorder.attached(mode, offset=i, batch=1):
                video = generate(pipe, prompts[i % len(prompts)], cfg.seed + i, **call)
            outputs.append(torch.as_tensor(video.frames).float().cpu().unsqueeze(0))
    shape = VideoShape(cfg.height, cfg.width, cfg.num_frames, cfg.max_sequence_length,
                       spatial_compression=cfg.model.spatial_compression,
                       temporal_compression=cfg.model.temporal_compression)
    flops = count_run_flops(CacheConfig(enabled=False), shape, cfg.num_steps, dict(pipe.transformer.config),
                            calls_per_step)
    settings_used = calibrate.app_settings(plain)
    made_for = calibrate.pipeline_made_for("hunyuan_video", settings_used, cfg.model.path)
    calibrate.write_and_report(TAG, out, recorder, reference, perturbed, flops.flops_uncached, "hunyuan_video",
                               settings_used, made_for, "videos")
    return out


@hydra.main(config_path=sample_app.CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
