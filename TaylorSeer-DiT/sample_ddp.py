"""Many samples for FID, data-parallel over ranks (torchrun), resumable, packed into an ADM ``.npz``.

    NPROC=8 bash scripts/sample_dit_ddp.sh num_samples=50000 cache.interval=4   # one process per GPU
    python -m taylorseer.harness.launch --nproc_per_node 8 -m taylorseer_dit.sample_ddp num_samples=50000  # the same
    srun --ntasks-per-node 8 --gpus-per-node 8 python -m taylorseer_dit.sample_ddp ...             # Slurm tasks

Sample ``i`` (0 <= i < num_samples) is a function of ``(seed, i)`` alone: its class is drawn from a
generator seeded ``(seed << 32) + i + 2**31`` and its noise from one seeded ``(seed << 32) + i``. (DiT's
own script seeds each rank with ``seed * world_size + rank``, so its samples change with the number of
GPUs; here a run may be resumed on another number of GPUs or with another batch size and the folder still
holds one consistent set.) The missing indices are dealt to the ranks round-robin; each PNG is written
atomically with a record of how it was made, so a rerun after a kill or a Slurm requeue makes exactly the
missing samples. Rank 0 checks and writes the run folder's identity (run.json) before anyone samples,
rewrites metrics.json as batches finish, and packs ``samples_<N>.npz`` once every rank is done.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

import taylorseer
from taylorseer import CacheConfig
from taylorseer.harness import calibrate, distributed, runfolder, runs
from taylorseer.harness.settings import Setting

from .diffusion import GaussianDiffusion
from .flops import count_flops
from .pipeline import load_model, sample, sample_seed, to_images, warm_up
from .sample import (
    CONFIG_DIR,
    SAMPLING_SCHEMA,
    enable_cache,
    run_identity,
    run_name,
    validate,
    weights_identity,
)

TAG = "sample_dit_ddp"
CONFIG_NAME = "sample_dit_ddp"  # configs/sample_dit_ddp.yaml
SCHEMA = {**SAMPLING_SCHEMA, "num_samples": Setting("int", minimum=1), "class_labels": Setting("list"),
          "compare_uncached": Setting("bool"), "grid_nrow": Setting("int", minimum=1)}
NOT_USED_HERE = ("grid_nrow", "class_labels", "compare_uncached")  # inherited from sample_dit.yaml


def class_label(seed: int, index: int, num_classes: int) -> int:
    gen = torch.Generator().manual_seed(sample_seed(seed, index) + (1 << 31))
    return int(torch.randint(num_classes, (1,), generator=gen))


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
    cache_config = validate(cfg, SCHEMA, TAG, check_labels=False)  # classes are drawn per sample
    session = distributed.init(cfg.device)  # torchrun, a Slurm step with K tasks, or a single process
    device, rank, world = session.device, session.rank, session.world_size
    dtype = runs.resolve_dtype(cfg.dtype, device)
    out_dir = run_dir(cfg)
    sample_dir = out_dir / "samples"
    npz = out_dir / f"samples_{cfg.num_samples}.npz"
    ident = run_identity(cfg, device, dtype, weights_identity(cfg), NOT_USED_HERE)
    if _finished(out_dir, ident, cfg.num_samples, npz):  # a rerun of a finished sweep point: no model loaded
        if session.is_main:
            print(f"[{TAG}] {out_dir} is complete ({cfg.num_samples} samples, {npz.name}); nothing to do")
        return npz
    model, vae = load_model(cfg, device, dtype)
    diffusion = GaussianDiffusion(cfg.num_steps, cfg.sampler, spacing=cfg.spacing)
    folder = runfolder.claim(out_dir, ident, session)
    try:
        if session.is_main:
            runs.write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        records = runfolder.Records(out_dir, writer=f"rank{rank}")
        done = records.done(lambda r: [r["file"]])
        todo = [i for i in range(cfg.num_samples) if i not in done]
        session.barrier()  # every rank has read the same state before anyone writes
        mine = session.shard(todo)
        enable_cache(model, cache_config, cfg)
        flops = count_flops(model, cache_config, cfg.num_steps, cfg.cfg_scale)
        if session.is_main:
            print(f"[{TAG}] {cfg.num_samples} samples, {len(todo)} to make on {world} rank(s) -> {sample_dir}")
        batches = [mine[k:k + cfg.batch_size] for k in range(0, len(mine), cfg.batch_size)]
        if batches and cfg.warmup:
            warm_up(model, diffusion, cfg.cfg_scale, len(batches[0]))
        for b, batch in enumerate(tqdm(batches, disable=not session.is_main or not cfg.progress, desc="batches")):
            seeds = [sample_seed(cfg.seed, i) for i in batch]
            labels = torch.tensor([class_label(cfg.seed, i, cfg.model.num_classes) for i in batch])
            timing: dict = {}
            with runs.timed(timing, device=device):
                images = to_images(sample(model, diffusion, labels, cfg.cfg_scale, seeds), vae).cpu()
            computed = taylorseer.get_cache(model).full_step_count  # this call's (adaptive: data-dependent)
            for k, i in enumerate(batch):
                array = (images[k] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                name = f"samples/{i:06d}.png"
                runs.save_image(out_dir / name, Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array))
                records.append(dict(index=i, label=int(labels[k]), seed=seeds[k], file=name,
                                    latency_s=timing["seconds"] / len(batch), rank=rank, world_size=world,
                                    cache_bytes=taylorseer.get_cache(model).nbytes(), full_steps=computed))
            if session.is_main and b % 10 == 9:
                _write_metrics(out_dir, cfg, cache_config, flops, device, world)
        session.barrier(distributed.WAIT_FOR_PEERS_S)  # the others may have a batch more to make
        if session.is_main:
            metrics = _write_metrics(out_dir, cfg, cache_config, flops, device, world, npz)
            if metrics["num_items"] < cfg.num_samples:
                raise RuntimeError(f"only {metrics['num_items']} of {cfg.num_samples} samples are in {sample_dir}")
            pack_npz(sample_dir, cfg.num_samples, npz)
            print(f"[{TAG}] wrote {npz} ({len(todo)} new samples this run)")
        session.barrier()
    finally:
        if folder is not None:
            folder.close()
        session.close()
    return npz


def check_config(cfg: DictConfig) -> None:
    """What a sweep checks for each point before it launches anything: every setting and the calibration's
    match (the weights may live only where the jobs run: they are found and fingerprinted by the run itself)."""
    validate(cfg, SCHEMA, TAG, check_labels=False)
    plain = OmegaConf.to_container(cfg, resolve=True)
    calibrate.check_run(plain, calibrate.dit_target(plain, None))


def run_dir(cfg: DictConfig) -> Path:
    """Where this app writes a run of ``cfg`` (the sweep harness asks every app the same question)."""
    cache_config = CacheConfig.from_dict(OmegaConf.to_container(cfg.cache, resolve=True))
    return Path(cfg.out_root) / "dit_fid" / (cfg.run_name or run_name(cfg, cache_config))


def _finished(out_dir: Path, ident: dict, num_samples: int, npz: Path) -> bool:
    """The folder holds this run, complete: same identity, every sample's PNG and record, the npz, metrics."""
    try:
        runfolder.check_identity(out_dir, ident)
    except runfolder.RunFolderError:
        return False  # not ours: the claim below says why, in one line
    metrics = runs.read_json(out_dir / "metrics.json") or {}
    if not (_npz_ok(npz, num_samples) and metrics.get("complete") and metrics.get("num_items") == num_samples):
        return False
    done = runfolder.Records(out_dir).done(lambda r: [r["file"]])
    return all(i in done for i in range(num_samples))


def _npz_ok(npz: Path, num_samples: int) -> bool:
    """The packed file is there and whole: a zip whose ``arr_0`` header says ``num_samples`` images (an empty,
    cut or foreign file is packed again)."""
    import zipfile

    try:
        with zipfile.ZipFile(npz) as archive, archive.open("arr_0.npy") as member:
            major, _ = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(member)
        return len(shape) == 4 and shape[0] == num_samples
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def _write_metrics(out_dir: Path, cfg: DictConfig, cache_config: CacheConfig, flops, device, world: int,
                   npz: Path | None = None) -> dict:
    """metrics.json from every rank's records: true after a kill, complete after the last barrier."""
    done = runfolder.Records(out_dir).done(lambda r: [r["file"]])
    done = {i: r for i, r in done.items() if i < cfg.num_samples}
    extra = dict(num_samples=cfg.num_samples, world_size=world, complete=len(done) == cfg.num_samples,
                 sampler=cfg.sampler, spacing=cfg.spacing, cfg_scale=cfg.cfg_scale, seed=cfg.seed)
    if npz is not None:
        extra["npz"] = str(npz)
    metrics = runs.sampling_metrics(cache_config, flops, [done[i] for i in sorted(done)], device, keep_items=False,
                                    **extra)
    runs.write_metrics(out_dir, metrics)
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
@runs.clear_errors(TAG, also=(AssertionError,))  # the scripts assert their arguments with messages
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
