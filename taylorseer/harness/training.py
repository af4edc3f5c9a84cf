"""The two pieces the bundled models' training scripts share (the digits DiT, the digits FLUX pipeline):
a learning rate with linear warm-up and cosine decay, and the EMA update of the weights that are saved."""

from __future__ import annotations

import math

import torch


def warmup_cosine_lr(step: int, total: int, lr: float, warmup: int, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at step ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - decay)
