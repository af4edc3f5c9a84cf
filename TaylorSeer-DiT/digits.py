"""The bundled model: a class-conditional DiT on scikit-learn's 8x8 digits (pixel space, CPU-friendly), its data,
its training, and the small classifier that scores its samples.

    bash scripts/train_digits.sh                   # DiT + classifier -> assets/ (about 20-30 min on 2 cores)
    python -m taylorseer_dit.digits steps=6000 batch_size=128

The digits (1797 images, 10 classes, values 0..16) ship inside scikit-learn, so the bundled DiT can
be trained and evaluated with no download. The classifier scores generated samples (accuracy of
the intended class) and its penultimate features define a digits FID.

Same DiT code as DiT-XL/2 (tiny config: hidden 128, depth 6, patch 2, 1 channel), epsilon
prediction with an MSE loss over 1000 linear-beta timesteps, label dropout 0.1 for classifier-free
guidance, AdamW with warm-up and cosine decay, EMA weights (those are saved). Seeded; a checkpoint
is written every ``save_every`` steps (atomic) and training resumes from it after a kill
(:func:`taylorseer.harness.training.train_steps`). The JSON beside the weights records the architecture,
the training config and the final loss, and ``pipeline.load_dit`` reads it, so the bundled model loads like
any other checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from taylorseer.harness import runs
from taylorseer.harness.training import load_resume, parse_overrides, save_resume, train_steps, warmup_cosine_lr

from .diffusion import GaussianDiffusion
from .models import DiT

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIT_CHECKPOINT = ASSETS / "digits_dit.pt"
CLASSIFIER_CHECKPOINT = ASSETS / "digits_classifier.pt"

ARCH = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0,
            class_dropout_prob=0.1, num_classes=10, learn_sigma=False)


def load_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Images in [-1, 1] as (N, 1, 8, 8) float32 and labels, split once with a fixed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n_test = int(round(len(labels) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return {"train_x": images[train], "train_y": labels[train], "test_x": images[test], "test_y": labels[test]}


class DigitsClassifier(nn.Module):
    """A small CNN: 8x8 -> 10 classes; ``features`` are the 128-d penultimate activations (for FID)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(steps: int = 3000, seed: int = 0, out: Path = CLASSIFIER_CHECKPOINT) -> dict:
    """Train with light shift/noise augmentation; save weights and a JSON record with test accuracy."""
    torch.manual_seed(seed)
    data = load_split()
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data["train_y"]), (128,), generator=g)
        x = augment(data["train_x"][idx], g)
        loss = nn.functional.cross_entropy(model(x), data["train_y"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    accuracy = classify_accuracy(model, data["test_x"], data["test_y"])
    torch.save(model.state_dict(), out)
    record = {"steps": steps, "seed": seed, "test_accuracy": accuracy, "final_loss": float(loss.detach())}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 1-pixel shifts and a little noise, so the classifier also judges imperfect samples."""
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return x + 0.1 * torch.randn(x.shape, generator=g)


@torch.no_grad()
def classify_accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def load_classifier(path: Path = CLASSIFIER_CHECKPOINT) -> DigitsClassifier:
    if not Path(path).is_file():
        raise FileNotFoundError(f"digits classifier {path} not found: train it with `bash scripts/train_digits.sh`")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# ------------------------------------------------------------------------------------------ training
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
    """The DiT, resumable: ``<out>.resume.pt`` holds the step, weights, optimiser and generator."""
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
    state = load_resume(resume_path)
    if state is not None:  # pick up where a killed run stopped
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        start, losses = state["step"], state["losses"]
        print(f"[train_digits] resuming at step {start}")

    def loss_at(_step: int) -> torch.Tensor:
        idx = torch.randint(len(y_all), (cfg.batch_size,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        eps = model(diffusion.q_sample(x0, t, noise), t, y)
        return torch.nn.functional.mse_loss(eps, noise)

    def save(step: int) -> None:
        save_resume(resume_path, dict(model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                      generator=g.get_state(), step=step, losses=losses))

    model.train()
    t0 = time.time()
    train_steps(model, opt, loss_at, start=start, steps=cfg.steps, losses=losses, lr_at=lambda s: lr_at(s, cfg),
                save=save, save_every=cfg.save_every, desc="train digits DiT", ema=ema, ema_decay=cfg.ema, clip=1.0)

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
    """``python -m taylorseer_dit.digits key=value ...``: the classifier, then the DiT."""
    cfg = TrainConfig()
    parse_overrides(cfg, argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if cfg.classifier_steps > 0:
        print("[train_digits] classifier:", train_classifier(steps=cfg.classifier_steps, seed=cfg.seed))
    train(cfg)


if __name__ == "__main__":
    main()
