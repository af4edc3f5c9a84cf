"""Sample HunyuanVideo with TaylorSeer: prompts -> mp4 files and metrics.json in a run folder.

    bash scripts/sample_hunyuan_video.sh                        # N=5, O=1, warm-up 1; 50 steps, 480x640x65
    bash scripts/sample_hunyuan_video.sh prompt_file=vbench_prompts.txt        # 5 videos per prompt, seeds 42..46
    bash scripts/sample_hunyuan_video.sh model.path=/data/HunyuanVideo cpu_offload=true cache.offload=true
    bash scripts/sample_hunyuan_video.sh cache=none                            # the uncached baseline

Run folder ``${out_root}/hunyuan_video/<cache tag>-<steps>steps-<H>x<W>x<F>``: ``{prompt}-{index}.mp4``
(VBench's naming; video ``index`` of a prompt is sampled with seed ``seed + index``), ``config.yaml``
(the exact config) and ``metrics.json`` (latency per video, denoising latency, FLOPs uncached/total and
compression counted on the meta device, cache bytes, peak memory, one record per video). A rerun skips
the videos already there, and refuses a folder written with other output-changing settings.

Everything that can be checked without the model (cache settings, unknown keys, prompts, sizes, the
run folder's earlier settings) is checked before the model loads.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taylorseer import CacheConfig, runs
from taylorseer.diffusers_io import read_prompts

from .cache import cached_module_names
from .estimate import VideoShape, count_run_flops
from .pipeline import attach_cache, generate, load_hunyuan_video, place
from .runner import StepProbe, kept_records, plan_items, summarize
from .video_io import video_filename, write_mp4

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
TAG = "sample_hunyuan_video"
# Keys of the composed config (a `+key=value` on the command line would otherwise be ignored silently).
KNOWN_KEYS = {"out_root", "device", "dtype", "seed", "progress", "model", "cache", "prompt", "prompt_file",
              "videos_per_prompt", "num_steps", "height", "width", "num_frames", "guidance_scale", "true_cfg_scale",
              "negative_prompt", "flow_shift", "max_sequence_length", "fps", "video_quality", "cpu_offload",
              "vae_tiling", "warmup", "run_name", "record_single_attention"}
MODEL_KEYS = {"name", "short_name", "path", "spatial_compression", "temporal_compression"}
# Settings that change the videos: a run folder made with other values is not resumed into.
VIDEO_KEYS = ("model.path", "dtype", "seed", "guidance_scale", "true_cfg_scale", "negative_prompt", "flow_shift",
              "max_sequence_length", "fps", "video_quality", "vae_tiling", "cache")


def _int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def _number(cfg: DictConfig, key: str, minimum: float, strict: bool = False) -> float:
    value = cfg[key]
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or value < minimum or (strict and value == minimum):
        raise ValueError(f"{key}={value!r} is invalid: expected a number {'>' if strict else '>='} {minimum}")
    return float(value)


def validate(cfg: DictConfig) -> tuple[CacheConfig, list[str]]:
    """Everything that can be checked before the model loads; returns the cache config and the prompts."""
    unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(KNOWN_KEYS)} "
                         f"(see configs/sample_hunyuan_video.yaml)")
    unknown = sorted(set(cfg.model.keys()) - MODEL_KEYS)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(MODEL_KEYS)}")
    cache_config = CacheConfig.from_dict(OmegaConf.to_container(cfg.cache, resolve=True))
    prompt = OmegaConf.to_object(cfg.prompt) if OmegaConf.is_config(cfg.prompt) else cfg.prompt
    prompts = read_prompts(prompt, cfg.prompt_file)
    for key in ("videos_per_prompt", "num_steps", "max_sequence_length"):
        _int(cfg, key)
    _int(cfg, "seed", minimum=0)
    spatial = 2 * cfg.model.spatial_compression  # the VAE, then the transformer's 2x2 patches
    for key in ("height", "width"):
        value = _int(cfg, key)
        if value % spatial:
            raise ValueError(f"{key}={value} is invalid: HunyuanVideo needs a multiple of {spatial} "
                             f"({cfg.model.spatial_compression}x VAE, 2x2 patches), e.g. 480x640 or 720x1280")
    frames, t = _int(cfg, "num_frames"), cfg.model.temporal_compression
    if (frames - 1) % t:
        raise ValueError(f"num_frames={frames} is invalid: expected {t}k+1 (the VAE compresses time {t}x), "
                         f"e.g. {(frames - 1) // t * t + 1} or {((frames - 1) // t + 1) * t + 1}")
    _number(cfg, "guidance_scale", 0.0)
    _number(cfg, "true_cfg_scale", 1.0)
    _number(cfg, "flow_shift", 0.0, strict=True)
    _number(cfg, "fps", 0.0, strict=True)
    if cfg.video_quality is not None and not 0 <= _number(cfg, "video_quality", 0.0) <= 10:
        raise ValueError(f"video_quality={cfg.video_quality} is invalid: expected 0..10 (imageio's scale) or null")
    for key in ("cpu_offload", "vae_tiling", "warmup", "progress", "record_single_attention"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key}={cfg[key]!r} is invalid: expected true or false")
    return cache_config, prompts


def run_dir(cfg: DictConfig, cache_config: CacheConfig) -> Path:
    name = cfg.run_name or (f"{cache_config.tag}-{cfg.num_steps}steps-{cfg.height}x{cfg.width}x{cfg.num_frames}")
    return Path(cfg.out_root) / "hunyuan_video" / name


def main(cfg: DictConfig) -> dict | None:
    """The run; returns the metrics written (None when every video was already there)."""
    cache_config, prompts = validate(cfg)
    device = runs.resolve_device(cfg.device)
    dtype = runs.resolve_dtype(cfg.dtype, device)
    if cfg.cpu_offload and device.type != "cuda":
        raise ValueError(f"cpu_offload=true needs a CUDA device (device resolves to {device}); set cpu_offload=false")
    out_dir = run_dir(cfg, cache_config)
    runs.check_resume(out_dir, cfg, VIDEO_KEYS)
    items = plan_items(prompts, cfg.videos_per_prompt, cfg.seed, video_filename)
    todo = [item for item in items if not (out_dir / item.file).is_file()]
    records = kept_records(out_dir, items)
    if not todo:
        print(f"[{TAG}] all {len(items)} videos are already in {out_dir}; nothing to do")
        return None

    pipe = load_hunyuan_video(cfg.model.path, dtype=dtype, flow_shift=cfg.flow_shift, vae_tiling=cfg.vae_tiling)
    if (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) != (
            cfg.model.spatial_compression, cfg.model.temporal_compression):
        raise ValueError(f"the VAE at {cfg.model.path} compresses {pipe.vae_scale_factor_spatial}x (space) and "
                         f"{pipe.vae_scale_factor_temporal}x (time), but model.spatial_compression/"
                         f"temporal_compression say {cfg.model.spatial_compression}/{cfg.model.temporal_compression}")
    cache = attach_cache(pipe, cache_config, cfg.num_steps, cfg.record_single_attention)
    place(pipe, device, cfg.cpu_offload)
    pipe.set_progress_bar_config(disable=not cfg.progress, leave=False)
    runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    call = dict(num_steps=cfg.num_steps, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                guidance_scale=cfg.guidance_scale, true_cfg_scale=cfg.true_cfg_scale,
                negative_prompt=cfg.negative_prompt, max_sequence_length=cfg.max_sequence_length, device=device)
    probe = StepProbe(pipe.transformer, cache, cfg.num_steps, device)
    if cfg.warmup:
        # Untimed: the first call of a process pays for kernel selection and allocator growth.
        generate(pipe, todo[0].prompt, todo[0].seed, **{**call, "num_steps": 1}, output_type="latent")
    runs.reset_peak_memory(device)
    bar = tqdm(todo, disable=not cfg.progress, desc=f"hunyuan_video {cache_config.tag}", unit="video")
    for item in bar:
        video = generate(pipe, item.prompt, item.seed, probe=probe, **call)
        write_mp4(out_dir / item.file, video.frames, fps=cfg.fps, quality=cfg.video_quality)
        records[item.file] = dict(prompt=item.prompt, index=item.index, seed=item.seed, file=item.file,
                                  latency_s=video.seconds, denoise_s=video.denoise_seconds,
                                  cache_bytes=video.stats.cache_bytes, full_steps=video.stats.full_steps())
    probe.remove()

    metrics = _metrics(cfg, cache_config, pipe, [records[i.file] for i in items if i.file in records], device, dtype)
    runs.write_metrics(out_dir, metrics)
    print(f"[{TAG}] {len(todo)} new, {len(records)} videos in {out_dir}")
    print(f"[{TAG}] {cache_config.tag}: {metrics['full_steps']}/{cfg.num_steps} full steps, FLOPs compression "
          f"{metrics['compression']:.2f}x, {metrics['latency_s']:.2f} s/video ({metrics['latency_denoise_s']:.2f} s "
          f"denoising), cache {_size(metrics['cache_bytes'])}")
    return metrics


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _metrics(cfg: DictConfig, cache_config: CacheConfig, pipe, items: list[dict], device, dtype) -> dict:
    calls_per_step = 2 if cfg.true_cfg_scale > 1 else 1
    shape = VideoShape(cfg.height, cfg.width, cfg.num_frames, cfg.max_sequence_length,
                       spatial_compression=cfg.model.spatial_compression,
                       temporal_compression=cfg.model.temporal_compression)
    # Counted on a meta-device copy of this transformer's architecture: exact FLOPs, no memory, ~seconds.
    flops = count_run_flops(cache_config, shape, cfg.num_steps, dict(pipe.transformer.config), calls_per_step,
                            cfg.record_single_attention)
    config = pipe.transformer.config
    totals = summarize(items)
    extra = dict(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        run_device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, fps=cfg.fps,
        video_tokens=shape.video_tokens(config.patch_size, config.patch_size_t),
        text_tokens=cfg.max_sequence_length,
        calls_per_step=calls_per_step,
        latency_denoise_s=totals["denoise_seconds"] / max(totals["num_items"], 1),
        cached_modules=(len(cached_module_names(pipe.transformer, cfg.record_single_attention))
                        if cache_config.enabled else 0),
        record_single_attention=cfg.record_single_attention,
        cache_location="pinned CPU memory" if cache_config.offload else f"{device.type} memory (with the model)",
        run_config=OmegaConf.to_container(cfg, resolve=True),
        items=items,
    )
    return runs.sampling_metrics(cache_config, flops, totals["num_items"], totals["seconds"], totals["cache_bytes"],
                                 device, **extra)


@hydra.main(config_path=CONFIG_DIR, config_name="sample_hunyuan_video", version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
