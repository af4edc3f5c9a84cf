"""Loading DiT weights (official checkpoints or the project's own) and the Stable Diffusion VAE.

Official checkpoints are plain state dicts named ``DiT-XL-2-{256,512}x{256,512}.pt``; checkpoints
written by a training script may hold the weights under ``"ema"`` (preferred) or ``"model"``. A
JSON file beside a checkpoint (``<name>.json``, key ``model``) records the architecture of models
trained here, so they load through the same function.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch

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
                              f"(DiT's arguments, as train_digits writes it)")
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
                              f"the checkpoint was trained (train_digits writes both), or pass the model.name of "
                              f"an official DiT ({', '.join(sorted(DiT_models))})")
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


def load_vae(vae: str, dtype: torch.dtype = torch.float32):
    """The SD VAE through diffusers: ``ema``/``mse`` (hub) or a local AutoencoderKL folder."""
    from diffusers.models import AutoencoderKL

    source = VAE_REPOS.get(vae, vae)
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype).eval()
    except (OSError, ValueError) as err:
        raise CheckpointNotFoundError(
            f"could not load the VAE {source!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            f"On a machine without network, run `huggingface-cli download {source} --local-dir DIR` elsewhere and "
            f"pass model.vae=DIR."
        ) from err
