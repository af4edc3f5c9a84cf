"""Sample HunyuanVideo with TaylorSeer: prompts -> mp4 files and metrics.json in a run folder.

    bash scripts/sample_hunyuan_video.sh                        # N=5, O=1, warm-up 1; 50 steps, 480x640x65
    bash scripts/sample_hunyuan_video.sh prompt_file=vbench_prompts.txt        # 5 videos per prompt, seeds 42..46
    bash scripts/sample_hunyuan_video.sh model.path=/data/HunyuanVideo cpu_offload=true cache.offload=true
    bash scripts/sample_hunyuan_video.sh cache=none                            # the uncached baseline

Run folder ``${out_root}/hunyuan_video/<cache tag>-<steps>steps-<H>x<W>x<F>``: ``{prompt}-{index}.mp4``
(VBench's naming; video ``index`` of a prompt is sampled with seed ``seed + index``), ``config.yaml``
(the exact config) and ``metrics.json`` (latency per video, denoising latency, FLOPs uncached/total and
compression counted on the meta device, cache bytes, peak memory, one record per video, rewritten after
every video), ``run.json`` (every setting that changes a video, checked on resume) and ``prompts.json``
(file -> exact prompt). A rerun makes only the missing videos and refuses a folder written with other
output-changing settings.

Everything that can be checked without the model (cache settings, unknown keys, prompts, sizes, the
run folder's earlier settings) is checked before the model loads.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import parallel
from taylorseer.harness import calibrate, distributed, runfolder, runs, settings
from taylorseer.harness.diffusers_io import content_fingerprint, read_prompts, run_folder_parts, weights_fingerprint
from taylorseer.harness.settings import Setting
from taylorseer.perf.attention import set_attention_backend

from .cache import UPSTREAM_FORM, cached_module_names
from .flops import VideoShape, count_run_flops, meta_transformer
from .pipeline import enable_cache, generate, load_hunyuan_video, place, transformer_config
from .runner import StepProbe, plan_items
from .video_io import video_filenames, write_mp4

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
TAG = "sample_hunyuan_video"
CONFIG_NAME = "sample_hunyuan_video"  # configs/sample_hunyuan_video.yaml
SCHEMA = {
    **settings.PIPELINE_APP,
    "model.spatial_compression": Setting("int", minimum=1),
    "model.temporal_compression": Setting("int", minimum=1),
    "videos_per_prompt": Setting("int", minimum=1),
    "height": Setting("int", minimum=1),
    "width": Setting("int", minimum=1),
    "num_frames": Setting("int", minimum=1),
    "flow_shift": Setting("float", minimum=1e-9, hint="> 0"),
    "fps": Setting("float", minimum=1e-9, hint="> 0"),
    "video_quality": Setting("float", minimum=0, maximum=10, nullable=True, hint="imageio's 0-10 scale"),
    "record_single_attention": Setting("bool"),
}


def validate(cfg: DictConfig) -> tuple[CacheConfig, list[str]]:
    """Everything that can be checked before the model loads; returns the cache config and the prompts."""
    plain, cache_config = settings.check_app(cfg, SCHEMA, TAG, "hunyuan_video", CONFIG_DIR)
    prompts = read_prompts(plain["prompt"], cfg.prompt_file)
    spatial = 2 * cfg.model.spatial_compression  # the VAE, then the transformer's 2x2 patches
    for key in ("height", "width"):
        if cfg[key] % spatial:
            raise ValueError(f"{key}={cfg[key]} is invalid: HunyuanVideo needs a multiple of {spatial} "
                             f"({cfg.model.spatial_compression}x VAE, 2x2 patches), e.g. 480x640 or 720x1280")
    frames, t = cfg.num_frames, cfg.model.temporal_compression
    if (frames - 1) % t:
        raise ValueError(f"num_frames={frames} is invalid: expected {t}k+1 (the VAE compresses time {t}x), "
                         f"e.g. {(frames - 1) // t * t + 1} or {((frames - 1) // t + 1) * t + 1}")
    if cfg.record_single_attention and cache_config.forecast_step != UPSTREAM_FORM:
        raise ValueError(f"record_single_attention=true records what upstream's form records, and the default form "
                         f"(cache.forecast_step={cache_config.forecast_step}) records no attention: add "
                         f"cache.forecast_step={UPSTREAM_FORM} for upstream's (paper-exact) form and memory")
    parallel.check_run(cfg.parallel.ulysses, cfg.parallel.ring, cache_impl=cfg.cache_impl,
                       cache_enabled=cache_config.enabled, cpu_offload=cfg.cpu_offload,
                       tokens=lambda: video_tokens(cfg))
    return cache_config, prompts


def check_config(cfg: DictConfig) -> None:
    """What a sweep checks for each point before it launches anything (settings, prompts, calibration)."""
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.check_run(plain, calibrate.pipeline_target("hunyuan_video", plain, None))


def video_tokens(cfg: DictConfig) -> dict[str, int]:
    """Video and text tokens of one call: latent frames x (H / 2s) x (W / 2s) (VAE, then 2x2 patches); the prompt
    padded to max_sequence_length."""
    frames = (cfg.num_frames - 1) // cfg.model.temporal_compression + 1
    side = 2 * cfg.model.spatial_compression
    return {"video": frames * (cfg.height // side) * (cfg.width // side), "text": cfg.max_sequence_length}


def run_dir(cfg: DictConfig) -> Path:
    """Where this app writes a run of ``cfg`` (the sweep harness asks every app the same question)."""
    tag, label = run_folder_parts(cfg)
    name = cfg.run_name or f"{tag}-{cfg.num_steps}steps-{cfg.height}x{cfg.width}x{cfg.num_frames}-{label}"
    return Path(cfg.out_root) / "hunyuan_video" / name


def run_identity(cfg: DictConfig, prompts: list[str], device, dtype, weights: str) -> dict:
    resolved = {"resolved.prompts": runfolder.digest(prompts), "resolved.device": device.type,
                "resolved.dtype": str(dtype).replace("torch.", ""), "resolved.weights": weights}
    plain = OmegaConf.to_container(cfg, resolve=True)
    resolved.update(calibrate.check_run(plain, calibrate.pipeline_target("hunyuan_video", plain,
                                                                         content_fingerprint(weights))))
    return runfolder.identity(plain, resolved, ignore=("parallel",),
                              ranks_per_generation=cfg.parallel.ulysses * cfg.parallel.ring)


def main(cfg: DictConfig) -> dict | None:
    """The run, data-parallel over the ranks of torchrun or a Slurm step (each rank a share of the videos).

    Returns the metrics written (every video of the folder, this run's and earlier ones) on the main
    process, None on the others."""
    cache_config, prompts = validate(cfg)
    if cfg.cpu_offload and distributed.select_device(cfg.device).type != "cuda":
        raise ValueError(f"cpu_offload=true needs a CUDA device (device={cfg.device!r} resolves to "
                         f"{distributed.select_device(cfg.device)}); set cpu_offload=false")
    session = distributed.init(cfg.device)
    try:
        return _run(cfg, cache_config, prompts, session)
    finally:
        session.close()


def _done(out_dir: Path, items) -> dict:
    """Records (every rank's) of the planned videos whose files are there."""
    planned = {item.file for item in items}
    done = runfolder.Records(out_dir, key="file").done(lambda r: [r["file"]])
    return {f: r for f, r in done.items() if f in planned}


def _run(cfg, cache_config, prompts, session) -> dict | None:
    device = session.device
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = run_dir(cfg)
    # Every file name is decided (and known to be writable and distinct) before anything is computed.
    items = plan_items(prompts, cfg.videos_per_prompt, cfg.seed, video_filenames(prompts, cfg.videos_per_prompt))
    weights = weights_fingerprint(cfg.model.path)
    runfolder.check_identity(out_dir, run_identity(cfg, prompts, device, dtype, weights),
                             skip=() if content_fingerprint(weights) else ("resolved.weights",))
    done = _done(out_dir, items)
    todo = [item for item in items if item.file not in done]
    if not todo:  # a finished folder: its metrics, without loading 13B parameters
        folder = runfolder.claim(out_dir, run_identity(cfg, prompts, device, dtype, weights), session)
        if folder is None:
            return None
        with folder:  # config.yaml and metrics.json both describe this invocation
            runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            metrics = _write_metrics(cfg, cache_config, transformer_config(cfg.model.path), items, done, device,
                                     dtype, sampled=False)
        print(f"[{TAG}] all {len(items)} videos are already in {out_dir}; metrics.json rewritten")
        return metrics

    pipe = load_hunyuan_video(cfg.model.path, dtype=dtype, flow_shift=cfg.flow_shift, vae_tiling=cfg.vae_tiling)
    if (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) != (
            cfg.model.spatial_compression, cfg.model.temporal_compression):
        raise ValueError(f"the VAE at {cfg.model.path} compresses {pipe.vae_scale_factor_spatial}x (space) and "
                         f"{pipe.vae_scale_factor_temporal}x (time), but model.spatial_compression/"
                         f"temporal_compression say {cfg.model.spatial_compression}/{cfg.model.temporal_compression}")
    set_attention_backend(pipe.transformer, cfg.attention_backend)
    ident = run_identity(cfg, prompts, device, dtype, weights_fingerprint(cfg.model.path))
    folder = runfolder.claim(out_dir, ident, session)
    try:
        cache = enable_cache(pipe, cache_config, cfg.num_steps, cfg.record_single_attention, cfg.cache_impl)
        place(pipe, device, cfg.cpu_offload)
        # Context parallel (after placing: the mesh is on the model's device): a generation's ranks share a video.
        _, layout = parallel.setup(pipe, cfg.parallel.ulysses, cfg.parallel.ring, rank=session.rank,
                                   world_size=session.world_size, tokens=video_tokens(cfg))
        if cfg.compile:
            taylorseer.compile(pipe.transformer)  # after the cache: the cache's own code stays out of the graphs
        pipe.set_progress_bar_config(disable=not cfg.progress or not session.is_main, leave=False)
        if session.is_main:
            runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            runs.write_json(out_dir / "prompts.json", {item.file: item.prompt for item in items})
        call = dict(num_steps=cfg.num_steps, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                    guidance_scale=cfg.guidance_scale, true_cfg_scale=cfg.true_cfg_scale,
                    negative_prompt=cfg.negative_prompt, max_sequence_length=cfg.max_sequence_length, device=device)
        records = runfolder.Records(out_dir, writer=f"rank{session.rank}", key="file")
        session.barrier()  # every rank has read the same state before anyone writes
        mine = layout.shard(todo)
        probe = StepProbe(pipe.transformer, cache, cfg.num_steps, device)
        if cfg.warmup and mine:
            # Untimed: the first call of a process pays for kernel selection and allocator growth.
            generate(pipe, mine[0].prompt, mine[0].seed, **{**call, "num_steps": 1}, output_type="latent")
        runs.reset_peak_memory(device)
        config = dict(pipe.transformer.config)
        bar = tqdm(mine, disable=not cfg.progress or not session.is_main, desc=f"hunyuan_video {cache_config.tag}",
                   unit="video")
        for item in bar:
            video = generate(pipe, item.prompt, item.seed, probe=probe, **call)
            if not layout.writes:
                continue
            write_mp4(out_dir / item.file, video.frames, fps=cfg.fps, quality=cfg.video_quality)
            records.append(dict(prompt=item.prompt, index=item.index, seed=item.seed, file=item.file,
                                latency_s=video.seconds, denoise_s=video.denoise_seconds,
                                cache_bytes=video.stats.cache_bytes, full_steps=video.stats.full_steps(),
                                rank=session.rank, context_parallel=layout.degree))
            if session.is_main:  # every rank's videos so far: true after a kill
                _write_metrics(cfg, cache_config, config, items, _done(out_dir, items), device, dtype)
        probe.remove()
        rank_bytes = session.gather(video.stats.cache_bytes if mine and cache is not None else 0)
        session.barrier(distributed.WAIT_FOR_PEERS_S)  # the others may have a video more to make
        if not session.is_main:
            return None
        done = _done(out_dir, items)
        metrics = _write_metrics(cfg, cache_config, config, items, done, device, dtype, world_size=session.world_size,
                                 context_parallel=layout.degree, cache_bytes_per_rank=rank_bytes)
    finally:
        if folder is not None:
            folder.close()
    print(f"[{TAG}] {len(todo)} new, {len(done)} videos in {out_dir}")
    print(f"[{TAG}] {cache_config.tag}: {metrics['full_steps']}/{cfg.num_steps} full steps, FLOPs compression "
          f"{metrics['compression']:.2f}x, {metrics['latency_s']:.2f} s/video ({metrics['latency_denoise_s']:.2f} s "
          f"denoising), cache {_size(metrics['cache_bytes'])}")
    return metrics


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


_FLOPS: dict = {}  # (settings, transformer config) -> FlopsReport: counted once per process


def _write_metrics(cfg: DictConfig, cache_config: CacheConfig, config: dict, items, done: dict, device,
                   dtype, sampled: bool = True, **more) -> dict:
    """metrics.json over every video of the folder, rewritten after each one (true after a kill). ``sampled=False``:
    a rerun of a finished folder, which keeps the sampling run's measured figures (peak memory, bytes per rank)."""
    calls_per_step = 2 if cfg.true_cfg_scale > 1 else 1
    shape = VideoShape(cfg.height, cfg.width, cfg.num_frames, cfg.max_sequence_length,
                       spatial_compression=cfg.model.spatial_compression,
                       temporal_compression=cfg.model.temporal_compression)
    key = (repr(shape), cfg.num_steps, cache_config, calls_per_step, cfg.record_single_attention, cfg.cache_impl,
           repr(config))
    if key not in _FLOPS:
        # Counted on a meta-device copy of this transformer's architecture: exact FLOPs, no memory, ~seconds.
        _FLOPS[key] = count_run_flops(cache_config, shape, cfg.num_steps, config, calls_per_step,
                                      cfg.record_single_attention, cfg.cache_impl)
    records = [done[i.file] for i in items if i.file in done]
    extra = dict(
        **more,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        run_device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        height=cfg.height, width=cfg.width, num_frames=cfg.num_frames, fps=cfg.fps,
        video_tokens=shape.video_tokens(config["patch_size"], config["patch_size_t"]),
        text_tokens=cfg.max_sequence_length,
        calls_per_step=calls_per_step,
        latency_denoise_s=sum(r.get("denoise_s", 0.0) for r in records) / max(len(records), 1),
        cached_modules=(len(cached_module_names_of(config, cfg.record_single_attention, cache_config.forecast_step))
                        if cache_config.enabled and cfg.cache_impl == "taylorseer" else 0),
        record_single_attention=cfg.record_single_attention,
        cache_location="pinned CPU memory" if cache_config.offload else f"{device.type} memory (with the model)",
        complete=len(records) == len(items),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    metrics = runs.sampling_metrics(cache_config, _FLOPS[key], records, device, **extra)
    runs.write_metrics(run_dir(cfg), metrics, sampled=sampled)
    return metrics


def cached_module_names_of(config: dict, single_attention: bool, forecast_step: str) -> list[str]:
    """The cached modules of a transformer of this config, named on a meta-device copy."""
    return cached_module_names(meta_transformer(config), single_attention, forecast_step)


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
