"""Sample FLUX with TaylorSeer: prompts -> PNGs and metrics.json in a run folder.

    bash scripts/sample_flux.sh                                   # FLUX.1-dev, N=6, O=1, warm-up 3, 50 steps, 1024^2
    bash scripts/sample_flux.sh prompt_file=prompts.txt cache.max_order=2 compare_uncached=true
    bash scripts/sample_flux.sh model.path=/data/FLUX.1-dev dtype=bfloat16 cpu_offload=true vae_tiling=true
    bash scripts/sample_flux.sh cache=none                       # the uncached baseline

Run folder ``${out_root}/flux/<model>-<cache tag>-<steps>steps-<H>x<W>-seed<seed>``: one PNG per image,
``{index:05d}-{prompt slug}.png`` (image ``index`` is sampled with seed ``seed + index``), ``config.yaml``
(the exact config), ``run.json`` (every setting that changes an image, checked on resume) and
``metrics.json`` (latency per image, FLOPs uncached/total and compression, cache bytes, peak memory; with
``compare_uncached`` also the uncached latency, wall speedup and PSNR/SSIM of every image against its
uncached twin in ``uncached/``), rebuilt from ``records/`` after every batch. A rerun makes only the
images that are missing; other prompts, sizes, steps, weights or cache settings need another folder.

Everything that can be checked without the model (settings, prompts, sizes, the run folder's earlier
settings) is checked before the model loads, and nothing is written before the model loaded.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from taylorseer import CacheConfig
from taylorseer.attach import parallel
from taylorseer.core.schedule import warm_up_steps
from taylorseer.harness import calibrate, distributed, runfolder, runs, settings
from taylorseer.harness.diffusers_io import content_fingerprint, read_prompts, run_folder_parts, weights_fingerprint
from taylorseer.harness.settings import Setting
from taylorseer.perf.attention import set_attention_backend
from taylorseer_eval.fidelity import finite_mean, psnr, ssim

from .flops import count_run_flops
from .pipeline import PIPELINES, FluxCache, flux_configs, generate, load_flux

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
TAG = "sample_flux"
CONFIG_NAME = "sample_flux"  # configs/sample_flux.yaml
SCHEMA = {
    **settings.PIPELINE_APP,
    "model.pipeline": Setting("str", choices=PIPELINES),
    "model.num_steps": Setting("int", minimum=1),
    "model.height": Setting("int", minimum=16, multiple_of=16),
    "model.width": Setting("int", minimum=16, multiple_of=16),
    "model.guidance_scale": Setting("float", minimum=0.0),
    "model.max_sequence_length": Setting("int", minimum=1),
    "model.default_prompt": Setting("any", nullable=True),
    "height": Setting("int", minimum=16, multiple_of=16, hint="FLUX: 8x VAE, 2x2 patches"),
    "width": Setting("int", minimum=16, multiple_of=16, hint="FLUX: 8x VAE, 2x2 patches"),
    "image": Setting("str", nullable=True),
    "batch_size": Setting("int", minimum=1),
    "num_images_per_prompt": Setting("int", minimum=1),
    "forecast_text": Setting("bool"),
    "compare_uncached": Setting("bool"),
    "vae_slicing": Setting("bool"),
}


def validate(cfg: DictConfig) -> tuple[CacheConfig, list[str]]:
    """Everything that can be checked before a model is loaded; returns the cache config and the prompts."""
    plain, cache_config = settings.check_app(cfg, SCHEMA, TAG, "flux", CONFIG_DIR)
    prompts = read_prompts(plain["prompt"], cfg.prompt_file)
    if cfg.cpu_offload and distributed.select_device(cfg.device).type != "cuda":
        raise ValueError(f"cpu_offload=true moves models to and from a CUDA device, but device={cfg.device!r} "
                         f"resolves to {distributed.select_device(cfg.device)}: set device=cuda or cpu_offload=false")
    if cfg.model.pipeline == "FluxKontextPipeline":
        if not cfg.image or not Path(cfg.image).expanduser().is_file():
            raise ValueError(f"image={cfg.image!r}: FLUX Kontext edits an input image; pass image=path/to/input.png")
        if cfg.true_cfg_scale > 1 and cache_config.enabled:
            raise ValueError("true_cfg_scale > 1 with FluxKontextPipeline: the pipeline does not name its cond/uncond "
                             "calls, so the cache cannot keep them apart; use true_cfg_scale=1 or cache=none")
    elif cfg.image:
        raise ValueError(f"image={cfg.image!r} is only used by FLUX Kontext (model=flux_kontext)")
    parallel.check_run(cfg.parallel.ulysses, cfg.parallel.ring, cache_impl=cfg.cache_impl,
                       cache_enabled=cache_config.enabled, cpu_offload=cfg.cpu_offload,
                       tokens=lambda: flux_tokens(cfg))
    return cache_config, prompts


def check_config(cfg: DictConfig) -> None:
    """What a sweep checks for each point before it launches anything (settings, prompts, calibration)."""
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.check_run(plain, calibrate.pipeline_target("flux", plain, None))


def flux_tokens(cfg: DictConfig) -> dict[str, int]:
    """Image and text tokens of one FluxPipeline call (8x VAE, 2x2 packing; the T5 prompt padded to its length)."""
    return {"image": (cfg.height // 16) * (cfg.width // 16), "text": cfg.max_sequence_length}


def run_dir(cfg: DictConfig) -> Path:
    """Where this app writes a run of ``cfg`` (the sweep harness asks every app the same question)."""
    tag, label = run_folder_parts(cfg)
    name = cfg.run_name or (f"{cfg.model.short_name}-{tag}-{cfg.num_steps}steps-{cfg.height}x{cfg.width}"
                            f"-seed{cfg.seed}-{label}")
    return Path(cfg.out_root) / "flux" / name


def run_identity(cfg: DictConfig, prompts: list[str], device, dtype, weights: str | None) -> dict:
    """Every setting that changes an image (the prompts' text, not the prompt file's name; the weights'
    fingerprint, not their path; the input image's bytes, not its name)."""
    resolved = {"resolved.prompts": runfolder.digest(prompts), "resolved.device": torch.device(device).type,
                "resolved.dtype": str(dtype).replace("torch.", "")}
    if cfg.image:
        resolved["resolved.image"] = runfolder.file_fingerprint(Path(cfg.image).expanduser())
    if weights is not None:
        resolved["resolved.weights"] = weights
    plain = OmegaConf.to_container(cfg, resolve=True)
    resolved.update(calibrate.check_run(plain, calibrate.pipeline_target("flux", plain, content_fingerprint(weights))))
    return runfolder.identity(plain, resolved, ignore=("image", "parallel"),
                              ranks_per_generation=cfg.parallel.ulysses * cfg.parallel.ring)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) floats in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in images])


def plan(cfg: DictConfig, prompts: list[str]) -> tuple[list[tuple[int, str]], dict[int, str]]:
    """The images of the run: (index, prompt) with image i of prompt i // num_images_per_prompt, and file names."""
    items = [(i * cfg.num_images_per_prompt + j, p) for i, p in enumerate(prompts)
             for j in range(cfg.num_images_per_prompt)]
    return items, {index: f"{index:05d}-{runs.slug(prompt)}.png" for index, prompt in items}


def finished_records(out_dir: Path, names: dict[int, str], compare: bool) -> dict:
    """Records of the images that are done: record and PNG there (and the comparison when this run compares)."""
    done = runfolder.Records(out_dir).done(lambda r: [r["file"]] + ([f"uncached/{r['file']}"] if "psnr" in r else []))
    return {i: r for i, r in done.items() if names.get(i) == r["file"] and (not compare or "psnr" in r)}


def resolve_model_path(cfg: DictConfig) -> None:
    """A relative ``model.path`` that is not there from the working directory but is in the repository (the
    bundled ``assets/digits_flux``) is taken from the repository, so the scripts work from any directory."""
    path = Path(str(cfg.model.path)).expanduser()
    in_repo = Path(__file__).resolve().parents[1] / path
    if not path.is_absolute() and not path.exists() and in_repo.is_dir():
        cfg.model.path = str(in_repo)


def main(cfg: DictConfig) -> dict | None:
    """The run; data-parallel over the ranks of torchrun or a Slurm step (each rank a share of the images).
    Returns the metrics on the main process (None on the others)."""
    cache_config, prompts = validate(cfg)
    resolve_model_path(cfg)
    session = distributed.init(cfg.device)
    try:
        return _run(cfg, cache_config, prompts, session)
    finally:
        session.close()


def _run(cfg, cache_config, prompts, session) -> dict | None:
    device = session.device
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = run_dir(cfg)
    items, names = plan(cfg, prompts)
    weights = weights_fingerprint(cfg.model.path)
    # Before the (long) load: a folder of other settings is refused now (hub weights are known once loaded).
    runfolder.check_identity(out_dir, run_identity(cfg, prompts, device, dtype, weights),
                             skip=() if content_fingerprint(weights) else ("resolved.weights",))
    compare = bool(cfg.compare_uncached and cache_config.enabled)
    done = finished_records(out_dir, names, compare)
    if all(index in done for index, _ in items):  # a rerun of a finished run (a sweep point): nothing to load
        folder = runfolder.claim(out_dir, run_identity(cfg, prompts, device, dtype, weights), session)
        if folder is None:
            return None
        with folder:  # config.yaml and metrics.json both describe this invocation
            runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            config, vae_scale = flux_configs(cfg.model.path)
            metrics = _metrics(cfg, cache_config, count_flops(cfg, cache_config, config, vae_scale, {}), done,
                               device, dtype, complete=True)
            runs.write_metrics(out_dir, metrics, sampled=False)
        print(f"[{TAG}] all {len(items)} images are already in {out_dir}; metrics.json rewritten")
        return metrics
    image = None
    if cfg.image:
        from diffusers.utils import load_image

        image = load_image(str(Path(cfg.image).expanduser()))

    pipe = load_flux(cfg.model.path, pipeline=cfg.model.pipeline, dtype=dtype, device=device,
                     cpu_offload=cfg.cpu_offload, vae_tiling=cfg.vae_tiling, vae_slicing=cfg.vae_slicing)
    set_attention_backend(pipe.transformer, cfg.attention_backend)
    folder = runfolder.claim(out_dir, run_identity(cfg, prompts, device, dtype, weights_fingerprint(cfg.model.path)),
                             session)
    try:
        return _sample(cfg, cache_config, items, names, pipe, image, out_dir, session, dtype)
    finally:
        if folder is not None:
            folder.close()


def _sample(cfg, cache_config, items, names, pipe, image, out_dir: Path, session, dtype) -> dict | None:
    device = session.device
    # Context parallel: the ranks of one generation sample the same images, split by tokens; one of them writes.
    cp, layout = parallel.setup(pipe, cfg.parallel.ulysses, cfg.parallel.ring, rank=session.rank,
                                world_size=session.world_size, tokens=flux_tokens(cfg))
    handle = FluxCache(pipe, cache_config, cfg.num_steps, forecast_text=cfg.forecast_text, impl=cfg.cache_impl,
                       compile=cfg.compile)
    handle.attach()
    compare = bool(cfg.compare_uncached and cache_config.enabled)
    call = dict(num_steps=cfg.num_steps, height=cfg.height, width=cfg.width, guidance_scale=cfg.guidance_scale,
                true_cfg_scale=cfg.true_cfg_scale, negative_prompt=cfg.negative_prompt,
                max_sequence_length=cfg.max_sequence_length, image=image, device=device)
    if session.is_main:
        runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    records = runfolder.Records(out_dir, writer=f"rank{session.rank}")
    todo = [item for item in items if item[0] not in finished_records(out_dir, names, compare)]
    session.barrier()  # every rank has read the same state before anyone writes
    mine = layout.shard(todo)

    shapes = _ShapeCapture(pipe.transformer)
    if mine and cfg.warmup:
        # Untimed: the first call of a process pays for kernel selection and allocator growth. On a CPU the fused
        # forecast kernels are also compiled at their first use (chosen by tensor size: the run's batch), so
        # there the warm-up runs until every forecast kernel has run (interval rule; 2 steps otherwise).
        steps = min(2, cfg.num_steps)
        if device.type == "cpu" and cache_config.schedule == "interval":
            steps = warm_up_steps(cache_config, cfg.num_steps)
        n = min(cfg.batch_size, len(mine))
        generate(pipe, [mine[0][1]] * n, [cfg.seed] * n, **{**call, "num_steps": steps}, output_type="latent")
    runs.reset_peak_memory(device)
    flops = None
    bar = tqdm(total=len(mine), disable=not cfg.progress or not mine or not session.is_main,
               desc=f"flux {cache_config.tag}", unit="img")
    for start in range(0, len(mine), cfg.batch_size):
        batch = mine[start:start + cfg.batch_size]
        indices, batch_prompts = [i for i, _ in batch], [p for _, p in batch]
        seeds = [cfg.seed + i for i in indices]
        gen = generate(pipe, batch_prompts, seeds, **call)
        reference = None
        if compare:
            handle.detach()
            try:
                reference = generate(pipe, batch_prompts, seeds, **call)
            finally:
                handle.attach()
        for k, (index, prompt) in enumerate(batch if layout.writes else []):
            record = dict(index=index, prompt=prompt, seed=seeds[k], file=names[index],
                          latency_s=gen.seconds / len(batch), cache_bytes=gen.cache_bytes,
                          full_steps=gen.full_steps, rank=session.rank, context_parallel=layout.degree)
            if reference is not None:
                x, ref = to_tensor([gen.images[k]]), to_tensor([reference.images[k]])
                record.update(uncached_latency_s=reference.seconds / len(batch),
                              psnr=finite_mean(psnr(x, ref)), ssim=float(ssim(x, ref).mean()))
                runs.save_image(out_dir / "uncached" / names[index], reference.images[k])
            runs.save_image(out_dir / names[index], gen.images[k])
            records.append(record)
        flops = flops or count_flops(cfg, cache_config, dict(pipe.transformer.config), pipe.vae_scale_factor,
                                     shapes.found)
        if session.is_main:  # every rank's records so far: true after a kill
            so_far = finished_records(out_dir, names, compare)
            runs.write_metrics(out_dir, _metrics(cfg, cache_config, flops, so_far, device, dtype,
                                                 complete=len(so_far) == len(items)))
        bar.update(len(batch))
    bar.close()
    shapes.remove()
    rank_bytes = session.gather(gen.cache_bytes if mine and cache_config.enabled else 0)
    flops = flops or count_flops(cfg, cache_config, dict(pipe.transformer.config), pipe.vae_scale_factor, shapes.found)
    session.barrier(distributed.WAIT_FOR_PEERS_S)  # the others may have a batch more to make
    if not session.is_main:
        return None
    done = finished_records(out_dir, names, compare)
    metrics = _metrics(cfg, cache_config, flops, done, device, dtype, world_size=session.world_size,
                       complete=len(done) == len(items), context_parallel=layout.degree,
                       cache_bytes_per_rank=rank_bytes)
    runs.write_metrics(out_dir, metrics)
    print(f"[{TAG}] {len(todo)} new, {len(done)} images in {out_dir}")
    summary = runs.summary_line(TAG, cache_config.tag, metrics, cfg.num_steps)
    print(summary)
    return metrics


class _ShapeCapture:
    """Image and text token counts of the transformer's first call, for the FLOPs count."""

    def __init__(self, transformer):
        self.found: dict = {}
        self._handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        if hidden is not None and text is not None and "image_tokens" not in self.found:
            self.found.update(image_tokens=int(hidden.shape[1]), text_tokens=int(text.shape[1]))

    def remove(self) -> None:
        self._handle.remove()


def count_flops(cfg: DictConfig, cache_config: CacheConfig, transformer_config: dict, vae_scale: int, shapes: dict):
    """FLOPs of one image's sampling run, on a meta copy of the pipeline's transformer."""
    if not shapes:
        # No call in this run (all images there already): FluxPipeline's token counts.
        patch = 2 * vae_scale
        shapes = dict(image_tokens=(cfg.height // patch) * (cfg.width // patch), text_tokens=cfg.max_sequence_length)
    return count_run_flops(transformer_config, cache_config, cfg.num_steps,
                           num_image_tokens=shapes["image_tokens"], text_tokens=shapes["text_tokens"],
                           calls_per_step=2 if cfg.true_cfg_scale > 1 else 1, forecast_text=cfg.forecast_text,
                           impl=cfg.cache_impl)


def _metrics(cfg: DictConfig, cache_config: CacheConfig, flops, records: dict, device, dtype, **more) -> dict:
    extra = dict(**more, model=OmegaConf.to_container(cfg.model, resolve=True), run_device=str(device),
                 dtype=str(dtype).replace("torch.", ""), seed=cfg.seed, calls_per_step=flops.calls_per_step,
                 run_config=OmegaConf.to_container(cfg, resolve=True))
    return runs.sampling_metrics(cache_config, flops, [records[i] for i in sorted(records)], device, **extra)


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
