"""Train the bundled class-conditional DiT on scikit-learn's 8x8 digits (pixel space, CPU-friendly).

    bash scripts/train_digits.sh                   # DiT + classifier -> assets/ (about 20-30 min on 2 cores)
    python -m taylorseer_dit.train_digits steps=6000 batch_size=128

Same DiT code as DiT-XL/2 (tiny config: hidden 128, depth 6, patch 2, 1 channel), epsilon
prediction with an MSE loss over 1000 linear-beta timesteps, label dropout 0.1 for classifier-free
guidance, AdamW with warm-up and cosine decay, EMA weights (those are saved). Seeded; a checkpoint
is written every ``save_every`` steps (atomic) and training resumes from it after a kill. The JSON
beside the weights records the architecture, the training config and the final loss, and
``checkpoints.load_dit`` reads it, so the bundled model loads like any other checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from taylorseer.harness import runs
from taylorseer.harness.training import ema_update, warmup_cosine_lr

from .diffusion import GaussianDiffusion
from .digits import DIT_CHECKPOINT, load_split, train_classifier
from .models import DiT

ARCH = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0,
            class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    min_lr: float = 2e-5
    ema: float = 0.999
    seed: int = 0
    save_every: int = 500
    out: str = str(DIT_CHECKPOINT)
    classifier_steps: int = 1500


def lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr)


def train(cfg: TrainConfig) -> dict:
    out = Path(cfg.out)
    resume_path = out.with_suffix(".resume.pt")
    torch.manual_seed(cfg.seed)
    data = load_split()
    x_all, y_all = data["train_x"], data["train_y"]
    model = DiT(**ARCH)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    diffusion = GaussianDiffusion(1000, "ddpm")  # the full 1000-step process
    g = torch.Generator().manual_seed(cfg.seed)
    start, losses = 0, []
    if resume_path.is_file():  # pick up where a killed run stopped
        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        if "rng" in state:  # the label dropout draws from torch's global generator
            torch.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]
        print(f"[train_digits] resuming at step {start}")

    model.train()
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train digits DiT")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(len(y_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        eps = model(diffusion.q_sample(x0, t, noise), t, y)
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, cfg.ema)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", lr=f"{lr_at(step, cfg):.1e}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            state = dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                         generator=g.get_state(), rng=torch.get_rng_state(), step=step + 1, losses=losses)
            runs.atomic_write(resume_path, lambda p, s=state: torch.save(s, p))

    final_loss = sum(losses[-200:]) / len(losses[-200:])
    runs.atomic_write(out, lambda p: torch.save(ema.state_dict(), p))
    record = {"model": ARCH, "train": asdict(cfg), "final_loss_last200": final_loss,
              "first_loss_first50": sum(losses[:50]) / 50, "train_seconds_this_session": time.time() - t0,
              "data": "sklearn load_digits, 80% train split (seed 0), pixels scaled to [-1, 1]"}
    runs.write_json(out.with_suffix(".json"), record)
    resume_path.unlink(missing_ok=True)
    print(f"[train_digits] saved EMA weights to {out} (loss over the last 200 steps {final_loss:.4f})")
    return record


def main(argv: list[str] | None = None) -> None:
    import sys

    cfg = TrainConfig()
    for arg in argv if argv is not None else sys.argv[1:]:
        key, _, value = arg.partition("=")
        if not hasattr(cfg, key):
            raise SystemExit(f"unknown option {key!r}; options: {list(asdict(cfg))}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if cfg.classifier_steps > 0:
        print("[train_digits] classifier:", train_classifier(steps=cfg.classifier_steps, seed=cfg.seed))
    train(cfg)


if __name__ == "__main__":
    main()
