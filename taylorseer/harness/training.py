"""What the bundled models' training scripts share (the digits DiT, the digits FLUX pipeline): the resumable
training loop, its resume file, a learning rate with linear warm-up and cosine decay, the EMA update of the
weights that are saved, and ``key=value`` command-line options."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .runs import atomic_write


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


def load_resume(path: str | Path) -> dict | None:
    """The resume state a killed training run left at ``path``, or None when there is none. Torch's global
    generator is restored too (DiT's label dropout draws from it), so a resumed run ends at the same weights."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    return state


def save_resume(path: str | Path, state: dict) -> None:
    """Write a resume state atomically (a kill while writing leaves the previous one), with torch's global
    generator."""
    state = {**state, "torch_rng": torch.get_rng_state()}
    atomic_write(path, lambda p: torch.save(state, p))


def parse_overrides(cfg, argv: list[str] | None) -> None:
    """Set ``key=value`` arguments (``sys.argv[1:]`` by default) on the dataclass ``cfg``, typed as its fields."""
    for arg in argv if argv is not None else sys.argv[1:]:
        key, _, value = arg.partition("=")
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown option {key!r}; options: {list(asdict(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(value))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_at: Callable[[int], torch.Tensor], *,
                start: int, steps: int, losses: list[float], lr_at: Callable[[int], float],
                save: Callable[[int], None], save_every: int, desc: str, ema: torch.nn.Module | None = None,
                ema_decay: float = 0.999, clip: float | None = None) -> list[float]:
    """The resumable loop both bundled models train with: steps ``start .. steps - 1`` of

        lr <- lr_at(step);  loss = loss_at(step);  backward;  clip the gradient norm to ``clip``;  step;  EMA

    ``loss_at`` draws the step's batch and noise (from the run's generator, so the order of the draws is the
    run's); ``losses`` gets every step's loss appended; ``save(step + 1)`` writes the resume state every
    ``save_every`` steps (not after the last: the caller saves the result and drops the resume file).
    """
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc)
    for step in bar:
        lr = lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if ema is not None:
            ema_update(ema, model, ema_decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{lr:.1e}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1)
    return losses
