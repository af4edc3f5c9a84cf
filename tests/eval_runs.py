"""Run folders as the sampling apps write them, built by the eval tests (no model involved)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROMPTS = ["a red cube on a table", "two cats", "a city at night", "a bowl of soup"]


def write_image_run(folder: Path, images: np.ndarray, prompts: list[str] | None = None, seed: int = 0,
                    extra_dirs: dict[str, np.ndarray] | None = None) -> Path:
    """A FLUX-style run: ``{index:05d}-x.png`` per image and metrics.json items (index, prompt, seed, file)."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    items = []
    for index, image in enumerate(images):
        name = f"{index:05d}-x.png"
        Image.fromarray(image).save(folder / name)
        for sub, others in (extra_dirs or {}).items():
            (folder / sub).mkdir(exist_ok=True)
            Image.fromarray(others[index]).save(folder / sub / name)
        items.append({"index": index, "prompt": prompts[index], "seed": seed + index, "file": name})
    (folder / "metrics.json").write_text(json.dumps({"num_items": len(items), "items": items}))
    return folder


def write_npz_run(folder: Path, images: np.ndarray) -> Path:
    """A DiT FID run: ``samples_<N>.npz`` (arr_0, uint8 NHWC) named by metrics.json["npz"]."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"samples_{len(images)}.npz"
    np.savez(npz, arr_0=images)
    (folder / "metrics.json").write_text(json.dumps({"num_samples": len(images), "npz": str(npz)}))
    return folder


def random_images(n: int, size: int = 16, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3), dtype=np.uint8)


class TinyPoolNet(torch.nn.Module):
    """pytorch-fid's call convention: [0, 1] NCHW floats -> [(N, D, 1, 1)]; counts the images it saw."""

    def __init__(self, dims: int = 6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dims, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=gen))
        self.seen = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor):
        self.seen += len(x)
        return [self.features(x)[:, :, None, None]]


def write_mp4(path: Path, frames: np.ndarray, fps: float = 8) -> Path:
    import imageio.v2 as imageio

    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=2) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def write_video_run(folder: Path, prompts: list[str], per_prompt: int = 2, frames: int = 6, size: int = 32) -> Path:
    """A HunyuanVideo-style run: ``{prompt}-{index}.mp4`` and metrics.json items (prompt, index, seed, file)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    items = []
    for prompt in prompts:
        for index in range(per_prompt):
            base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            clip = np.stack([np.roll(base, t, axis=1) for t in range(frames)])
            name = f"{prompt}-{index}.mp4"
            write_mp4(folder / name, clip)
            items.append({"prompt": prompt, "index": index, "seed": 42 + index, "file": name})
    (folder / "metrics.json").write_text(json.dumps({"num_items": len(items), "items": items}))
    return folder
