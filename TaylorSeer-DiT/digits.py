"""The bundled toy domain: scikit-learn's 8x8 handwritten digits, and a small classifier for them.

The digits (1797 images, 10 classes, values 0..16) ship inside scikit-learn, so the bundled DiT can
be trained and evaluated with no download. The classifier scores generated samples (accuracy of
the intended class) and its penultimate features define a digits FID.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIT_CHECKPOINT = ASSETS / "digits_dit.pt"
CLASSIFIER_CHECKPOINT = ASSETS / "digits_classifier.pt"


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
