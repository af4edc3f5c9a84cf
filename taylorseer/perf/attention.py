"""Attention backends per run: PyTorch SDPA (default), flash-attn or xformers.

    taylorseer.perf.attention.set_attention_backend(model, "flash")   # config value attention_backend=flash

One function for every model of the project: diffusers transformers (FLUX, HunyuanVideo, any
``ModelMixin``) through diffusers' own ``set_attention_backend``; the DiT written here through its
``set_attention_backend``. Before anything is changed the backend is *probed*: a tiny attention call
on the model's device and dtype. A backend that is not installed or cannot run there (flash-attn
without CUDA, xformers on a CPU, a GPU too old for flash-attn 2) fails with one error that names the
fallback, ``attention_backend=sdpa``, which runs everywhere and is what the model uses by default.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "xformers")
PACKAGES = {"flash": "flash_attn", "xformers": "xformers"}
INSTALL = {"flash": "pip install flash-attn --no-build-isolation (CUDA only)", "xformers": "pip install xformers"}
# diffusers' AttentionBackendName values for ours.
DIFFUSERS_NAMES = {"sdpa": "native", "flash": "flash", "xformers": "xformers"}
FALLBACK = "use attention_backend=sdpa (PyTorch's scaled_dot_product_attention, the default, runs on every device)"


class AttentionBackendError(RuntimeError):
    """The requested attention backend is not installed or cannot run on this device."""


def attention_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(q, k, v)`` for (B, heads, tokens, head_dim) tensors, SDPA's layout, with backend ``name``."""
    _check_name(name)
    if name == "sdpa":
        return F.scaled_dot_product_attention
    if name == "flash":
        from flash_attn import flash_attn_func

        # flash-attn and xformers take (B, tokens, heads, head_dim).
        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    from xformers.ops import memory_efficient_attention

    return lambda q, k, v: memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)


def check_attention_backend(name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
    """Raise :class:`AttentionBackendError` (one line, naming the fallback) unless ``name`` runs on ``device``."""
    _check_name(name)
    device = torch.device(device)
    if name == "sdpa" or device.type == "meta":
        return
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise AttentionBackendError(f"attention_backend={name} is not available: {PACKAGES[name]} is not installed "
                                    f"({INSTALL[name]}); {FALLBACK}")
    reason = _probe(name, device.type if device.index is None else str(device), _probe_dtype(name, device, dtype))
    if reason:
        raise AttentionBackendError(f"attention_backend={name} cannot run on {device.type}: {reason}; {FALLBACK}")


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
    """The backends that run on ``device`` (always starts with sdpa)."""
    out = []
    for name in BACKENDS:
        try:
            check_attention_backend(name, device, dtype)
        except AttentionBackendError:
            continue
        out.append(name)
    return out


def set_attention_backend(model: torch.nn.Module, name: str) -> str:
    """Make every attention of ``model`` use backend ``name``; returns the name the model took.

    Probed on the model's device and dtype first: a backend that cannot run changes nothing and
    raises one :class:`AttentionBackendError` that names the fallback.
    """
    _check_name(name)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    check_attention_backend(name, device, param.dtype if param is not None else None)
    if _is_diffusers_model(model):
        if name == "sdpa":
            model.reset_attention_backend()
            return DIFFUSERS_NAMES[name]
        try:
            _quiet_diffusers(model.set_attention_backend, DIFFUSERS_NAMES[name])
        except (RuntimeError, ValueError, ImportError) as error:  # diffusers' own requirement checks
            model.reset_attention_backend()
            first = str(error).strip().splitlines()[0][:200]
            raise AttentionBackendError(f"attention_backend={name} cannot be used by {type(model).__name__}: "
                                        f"{first}; {FALLBACK}") from error
        return DIFFUSERS_NAMES[name]
    if hasattr(model, "set_attention_backend"):
        model.set_attention_backend(name)
        return name
    raise TypeError(f"{type(model).__name__} has no attention backend setting: expected a diffusers model or a "
                    f"model with set_attention_backend(name)")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention_backend={name!r} is invalid: expected one of {list(BACKENDS)}")


def _is_diffusers_model(model) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        return False
    return isinstance(model, ModelMixin)


def _quiet_diffusers(fn, *args) -> None:
    """diffusers logs 'experimental feature' at warning level on every call; once per run is enough."""
    from diffusers.utils import logging

    logger = logging.get_logger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        fn(*args)
    finally:
        logger.setLevel(level)


def _probe_dtype(name: str, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if name == "flash" and dtype not in (torch.float16, torch.bfloat16):
        return torch.bfloat16 if device.type == "cuda" else torch.float16  # flash-attn runs half precision only
    return dtype or torch.float32


@functools.cache
def _probe(name: str, device: str, dtype: torch.dtype) -> str | None:
    """None when a tiny attention call runs with ``name`` on ``device``, else the first line of its error."""
    try:
        fn = attention_fn(name)
        q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
        out = fn(q, q, q)
        if out.shape != q.shape:
            return f"the probe returned shape {tuple(out.shape)}"
    except Exception as error:  # the package's own reason: no kernel for this device, GPU too old, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {first[:200]}"
    return None
