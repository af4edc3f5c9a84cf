"""Reading what the sampling apps write: PNG/JPEG images, mp4 videos and ADM-style ``.npz`` batches.

Everything comes out as uint8 RGB arrays, (H, W, 3) per image and (F, H, W, 3) per video, the form the
metric networks' own preprocessing starts from. ``.npz`` files are read in batches straight from the
zip member, as ADM's evaluator does, so a 50,000-image DiT batch (9.8 GB at 256x256) never has to fit
in memory.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; grayscale (the digits model) and RGBA images are converted."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)


def load_video(path: str | Path) -> np.ndarray:
    """All frames, (F, H, W, 3) uint8 RGB, through imageio's ffmpeg (the binary imageio-ffmpeg ships)."""
    import imageio.v2 as imageio

    with imageio.get_reader(Path(path), format="FFMPEG") as reader:
        frames = [np.asarray(frame, dtype=np.uint8)[..., :3] for frame in reader]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def load_frames(path: str | Path) -> np.ndarray:
    """An image as one frame (1, H, W, 3) or a video's frames (F, H, W, 3): paired metrics treat both alike."""
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        return load_video(path)
    return load_image(path)[None]


class NpzImages:
    """The uint8 (N, H, W, 3) array ``key`` of an ``.npz``, read lazily in batches (ADM's ``arr_0`` layout)."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        with zipfile.ZipFile(self.path) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if key not in names:
                raise ValueError(f"{self.path} has no array {key!r} (it holds {names}); an image batch needs arr_0 "
                                 f"(uint8, N x H x W x 3), statistics need mu and sigma")
            with archive.open(f"{key}.npy") as member:
                self.shape, self.dtype, _ = _read_header(member)
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise ValueError(f"{self.path}:{key} is {self.dtype} {self.shape}; expected uint8 images (N, H, W, 3) as "
                             f"ADM's sampler writes them")

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            _read_header(member)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = member.read(count * row)
                if len(data) != count * row:
                    raise ValueError(f"{self.path}:{self.key} is truncated at image {start}")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def _read_header(member) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran:
        raise ValueError("Fortran-ordered .npy arrays are not supported; save the images with np.savez (C order)")
    return shape, dtype, fortran


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


def file_batches(paths: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    """Images of ``paths`` in order, stacked in batches (N, H, W, 3); sizes must agree within a batch."""
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} around {paths[start]}: resize them to one "
                             f"size first (Inception metrics compare images of one resolution)")
        yield np.stack(images)
