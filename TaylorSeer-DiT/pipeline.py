"""DiT's pipeline: loading the weights (official checkpoints or the project's own) and the Stable Diffusion VAE,
and the sampler (class labels -> latents -> images).

Official checkpoints are plain state dicts named ``DiT-XL-2-{256,512}x{256,512}.pt``; checkpoints
written by a training script may hold the weights under ``"ema"`` (preferred) or ``"model"``. A
JSON file beside a checkpoint (``<name>.json``, key ``model``) records the architecture of models
trained here, so they load through the same function. The sampler reads the cache, if one is attached
(:mod:`.cache`), only to reset it at the start of every call; with classifier-free guidance the
conditional and unconditional halves run as one batch, so they share one cache context, as upstream does.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

import taylorseer
from taylorseer.core.schedule import warm_up_steps
from taylorseer.harness.diffusers_io import dtype_keyword
from taylorseer.perf.attention import set_attention_backend

from .diffusion import GaussianDiffusion, StepCallback, draw_noise
from .models import DiT, DiT_models

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
LATENT_SCALE = 0.18215
REPO_ROOT = Path(__file__).resolve().parents[1]  # sampled latents are divided by this before decoding


class CheckpointNotFoundError(FileNotFoundError):
    pass


class CheckpointError(ValueError):
    """The checkpoint file exists but cannot be used; the message says why."""


def official_name(model: str, image_size: int) -> str:
    return f"{model.replace('/', '-')}-{image_size}x{image_size}.pt"


def find_checkpoint(checkpoint: str | None, model: str, image_size: int, ckpt_dir: str | None = None) -> Path:
    """The checkpoint file to load: ``checkpoint`` if given, else the official name looked up in
    ``ckpt_dir``, ``./pretrained_models`` and ``$TAYLORSEER_CKPT_DIR``. One clear error otherwise."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if path.is_file():
            return path
        if not path.is_absolute() and (REPO_ROOT / path).is_file():  # e.g. assets/, from another directory
            return REPO_ROOT / path
        raise CheckpointNotFoundError(f"model.checkpoint={checkpoint!r} does not exist ({path.resolve()})")
    name = official_name(model, image_size)
    dirs = [d for d in (ckpt_dir, "pretrained_models", os.environ.get("TAYLORSEER_CKPT_DIR")) if d]
    for d in dirs:
        if (Path(d).expanduser() / name).is_file():
            return Path(d).expanduser() / name
    looked = ", ".join(str(Path(d).expanduser().resolve()) for d in dict.fromkeys(dirs))
    raise CheckpointNotFoundError(
        f"DiT checkpoint {name} not found (looked in: {looked}). Download the official weights with\n"
        f"  mkdir -p pretrained_models && wget -P pretrained_models {OFFICIAL_URL.format(name=name)}\n"
        f"or pass model.checkpoint=/path/to/{name} (or set TAYLORSEER_CKPT_DIR)."
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a plain state dict, or a training checkpoint's ``ema`` (else ``model``).

    DiT's ``train.py`` saves ``{"model", "ema", "opt", "args"}`` with ``args`` an ``argparse.Namespace``:
    that one class is allowed besides tensors (weights-only loading, no arbitrary code). A file that is
    not a checkpoint (truncated, another format) fails with one message naming it.
    """
    import argparse
    import pickle
    import zipfile

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or another format?): {first}. "
                              f"Download it again or pass another model.checkpoint=...") from err
    for key in ("ema", "model", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__} without a state dict (expected the weights, or "
                              f"a training checkpoint with 'ema' or 'model')")
    return ckpt


def read_architecture(meta: Path) -> dict:
    """The ``model`` entry (DiT's keyword arguments) of the JSON file beside a checkpoint trained here."""
    try:
        data = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta} (the architecture of the checkpoint beside it) cannot be read as JSON: "
                              f"{err}") from err
    arch = data.get("model") if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise CheckpointError(f"{meta} (beside the checkpoint) has no \"model\" entry with the architecture "
                              f"(DiT's arguments, as scripts/train_digits.sh writes it)")
    try:
        inspect.signature(DiT).bind(**arch)
    except TypeError as err:
        raise CheckpointError(f"{meta}: its \"model\" entry is not DiT's arguments: {err}") from err
    return arch


def build_model(model: str, image_size: int, num_classes: int = 1000, in_channels: int = 4, latent: bool = True,
                **kwargs) -> DiT:
    if model not in DiT_models:
        raise ValueError(f"model.name={model!r} is unknown; choose one of {sorted(DiT_models)}")
    input_size = image_size // 8 if latent else image_size
    return DiT_models[model](input_size=input_size, num_classes=num_classes, in_channels=in_channels, **kwargs)


def load_dit(path: str | Path, model: str = "DiT-XL/2", image_size: int = 256, num_classes: int = 1000,
             in_channels: int = 4, latent: bool = True) -> DiT:
    """Build the architecture and load ``path`` strictly (every released key must match)."""
    path = Path(path)
    meta = path.with_suffix(".json")
    if meta.is_file():  # a model trained here records its own architecture
        dit = DiT(**read_architecture(meta))
    elif model not in DiT_models:
        raise CheckpointError(f"model.name={model!r} is not an official DiT, so its architecture is read from "
                              f"{meta} beside the checkpoint {path}, and that file is missing: copy it from where "
                              f"the checkpoint was trained (scripts/train_digits.sh writes both), or pass the "
                              f"model.name of an official DiT ({', '.join(sorted(DiT_models))})")
    else:
        dit = build_model(model, image_size, num_classes, in_channels, latent)
    state = load_state_dict(path)
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit {model} at {image_size}px: missing keys {missing[:4]}, unexpected keys "
            f"{unexpected[:4]}, shape mismatches {wrong[:3]} (check model.name and model.image_size)"
        )
    dit.load_state_dict(state, strict=True)
    return dit.eval()


def load_model(cfg, device: torch.device, dtype: torch.dtype):
    """(model, vae) for an app's ``cfg`` (its ``model.*`` settings and ``attention_backend``): everything that
    can fail on missing or broken weights (or an attention backend that cannot run here) fails here."""
    path = find_checkpoint(cfg.model.checkpoint, cfg.model.name, cfg.model.image_size, cfg.model.ckpt_dir)
    model = load_dit(path, cfg.model.name, cfg.model.image_size, cfg.model.num_classes, cfg.model.in_channels,
                     cfg.model.latent).to(device=device, dtype=dtype)
    set_attention_backend(model, cfg.attention_backend)
    vae = load_vae(cfg.model.vae, dtype).to(device) if cfg.model.latent else None
    return model, vae


def load_vae(vae: str, dtype: torch.dtype = torch.float32):
    """The SD VAE through diffusers: ``ema``/``mse`` (hub) or a local AutoencoderKL folder."""
    from diffusers.models import AutoencoderKL

    source = VAE_REPOS.get(vae, vae)
    try:
        return AutoencoderKL.from_pretrained(source, **{dtype_keyword(): dtype}).eval()
    except (OSError, ValueError) as err:
        raise CheckpointNotFoundError(
            f"could not load the VAE {source!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            f"On a machine without network, run `huggingface-cli download {source} --local-dir DIR` elsewhere and "
            f"pass model.vae=DIR."
        ) from err


# ------------------------------------------------------------------------------------------- sampler
class _WarmedUp(Exception):
    pass


def warm_up(model: DiT, diffusion: GaussianDiffusion, cfg_scale: float, batch: int) -> None:
    """An untimed call (class 0, seed 0) with the run's sampler, cache and batch size: a process's first call
    pays one-off costs (allocator growth, kernel selection; on a CPU the fused forecast kernel of each
    arity is generated and compiled at its first use, and chosen by tensor size, hence the real batch).
    With the interval schedule it stops once every factor exists and forecast steps have used them all
    (warm-up + (O + 2) N steps); other schedules run the whole call. The cache is reset afterwards."""
    cache = taylorseer.get_cache(model)
    stop = diffusion.num_steps if cache is None else warm_up_steps(cache.config, diffusion.num_steps)

    def stop_early(step, _x):
        if step + 1 >= stop:
            raise _WarmedUp

    try:
        sample(model, diffusion, torch.zeros(batch, dtype=torch.long), cfg_scale, 0, callback=stop_early)
    except _WarmedUp:
        pass
    if cache is not None:
        cache.reset()


def initial_noise(model: DiT, n: int, generator, device) -> torch.Tensor:
    shape = (n, model.in_channels, model.input_size, model.input_size)
    return draw_noise(shape, generator, device, torch.float32)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run seeded ``seed``: its noise (and, for FID runs, its class)
    depend on nothing else, not the batch size, the world size or which rank made it."""
    return (int(seed) << 32) + int(index)


@torch.no_grad()
def sample(model: DiT, diffusion: GaussianDiffusion, labels: torch.Tensor, cfg_scale: float,
           seed: int | Sequence[int], progress: bool = False, callback: StepCallback | None = None,
           guidance_channels: int | None = None) -> torch.Tensor:
    """Latents (or pixels) for ``labels`` from the noise of ``seed``: (N, C, H, W).

    ``seed`` is one seed for the whole batch, or one per sample (then each sample's noise comes from its
    own generator, and a sample is the same whatever batch it is sampled in). The cache, if attached, is
    reset first, so repeated calls are independent. Noise is drawn on the CPU so the same seed gives the
    same samples on any device.
    """
    device = next(model.parameters()).device
    cache = taylorseer.get_cache(model)
    if cache is not None:
        cache.reset(num_steps=diffusion.num_steps)
    if isinstance(seed, int):
        generator = torch.Generator().manual_seed(seed)
    else:
        if len(seed) != len(labels):
            raise ValueError(f"{len(seed)} seeds for {len(labels)} labels: give one seed per sample (or one int)")
        generator = [torch.Generator().manual_seed(int(s)) for s in seed]
    z = initial_noise(model, len(labels), generator, device).to(next(model.parameters()).dtype)
    labels = labels.to(device)
    if cfg_scale > 1.0:
        z = torch.cat([z, z], dim=0)
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)], dim=0)

        def model_fn(x, t, y):
            return model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)
    else:
        model_fn = model
    out = diffusion.sample_loop(model_fn, z, dict(y=labels), generator=generator, progress=progress,
                                callback=callback)
    return out.chunk(2, dim=0)[0] if cfg_scale > 1.0 else out


@torch.no_grad()
def to_images(samples: torch.Tensor, vae=None) -> torch.Tensor:
    """Samples -> float images in [0, 1], (N, 3 or C, H, W); latents go through the VAE first."""
    if vae is not None:
        samples = vae.decode((samples / LATENT_SCALE).to(vae.dtype)).sample
    return ((samples.float() + 1) / 2).clamp(0, 1)
