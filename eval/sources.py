"""Sets of images for distribution metrics (FID, IS, KID, precision/recall), and a cache for the reference's
features or statistics kept next to the reference file.

A source is an ADM ``.npz`` (``arr_0``), a DiT FID run folder (its ``metrics.json["npz"]``, else its
``samples/`` PNGs), any run folder (its items) or a plain folder of images. The cache key of a reference
is a fingerprint of its bytes (a SHA-256 of an ``.npz``; of names, sizes and contents for a folder) plus
the feature network's identity, so a changed reference, or another network, is never mistaken for the
cached one.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from taylorseer.harness.distributed import select_device
from taylorseer.harness.runs import atomic_write, read_json

from .media import IMAGE_SUFFIXES, NpzImages, file_batches
from .rundir import SKIP, NotARunFolderError, open_run


@dataclass
class ImageSource:
    """Where images come from: ``npz`` (lazy) or ``files`` (in order)."""

    path: Path
    description: str
    npz: NpzImages | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.npz) if self.npz is not None else len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """(N, H, W, 3) uint8 batches in a fixed order."""
        if self.npz is not None:
            return self.npz.batches(batch_size)
        return file_batches(self.files, batch_size)

    def fingerprint(self) -> str:
        """SHA-256 of what the images are: the file's bytes, or every image's name, size and bytes."""
        digest = hashlib.sha256()
        paths = [self.path] if self.npz is not None else self.files
        for path in paths:
            if self.npz is None:
                digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        return digest.hexdigest()


def image_source(path: str | Path) -> ImageSource:
    """Resolve ``path`` (an ``.npz``, a run folder or a folder of images) to an :class:`ImageSource`."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: expected an .npz of images (arr_0) or a folder of images")
        npz = NpzImages(path)
        return ImageSource(path, f"{path.name}:arr_0 ({len(npz)} images)", npz=npz)
    if not path.is_dir():
        raise NotARunFolderError(f"{path} does not exist: pass a run folder, a folder of images or an .npz")
    npz_name = (read_json(path / "metrics.json") or {}).get("npz")
    if npz_name:
        # sample_ddp records the path it wrote, relative to where it ran: also look inside the folder.
        for candidate in (Path(npz_name), path / Path(npz_name).name):
            if candidate.is_file():
                npz = NpzImages(candidate)
                return ImageSource(candidate, f"{candidate.name}:arr_0 ({len(npz)} images)", npz=npz)
    samples = path / "samples"
    if samples.is_dir():
        files = sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            return ImageSource(samples, f"{samples} ({len(files)} PNGs)", files=files)
    if not (path / "metrics.json").is_file():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in SKIP)
        if files:
            return ImageSource(path, f"{path} ({len(files)} images)", files=files)
    run = open_run(path, "image")
    return ImageSource(path, f"{path} ({len(run.items)} images)", files=[i.path for i in run.items])


def feature_pass(source: ImageSource, extract: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int,
                 device: torch.device, desc: str) -> dict[str, np.ndarray]:
    """Run ``extract`` (uint8 NCHW on ``device`` -> named (N, D) features) over every image, in order."""
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode(), tqdm(total=len(source), desc=desc, unit="img", leave=False) as bar:
        for batch in source.batches(batch_size):
            x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).to(device)  # a writable copy
            for name, value in extract(x).items():
                parts.setdefault(name, []).append(value.detach().double().cpu().numpy())
            bar.update(len(batch))
    if not parts:
        raise ValueError(f"{source.path} holds no images")
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def cached_reference(source: ImageSource, tag: str, compute: Callable[[], dict[str, np.ndarray]]) -> tuple[
        dict[str, np.ndarray], Path]:
    """``compute()`` once per (reference contents, ``tag``); the arrays are kept in
    ``<reference>.<tag>.<fingerprint>.npz`` beside it (or under ``~/.cache/taylorseer`` if that folder is
    read-only). Returns the arrays and the cache file."""
    key = source.fingerprint()[:16]
    name = f"{source.path.name}.{tag}.{key}.npz"
    target = source.path.parent / name
    if not os.access(source.path.parent, os.W_OK) and not target.is_file():
        target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taylorseer" / name
    if target.is_file():
        with np.load(target) as cached:
            return {k: cached[k] for k in cached.files}, target
    arrays = compute()
    atomic_write(target, lambda p: np.savez(p, **arrays))
    print(f"[eval] cached the reference's {tag} in {target}", file=sys.stderr)
    return arrays, target


def resolve_device(name: str) -> torch.device:
    """A metric's ``--device``, resolved as the apps resolve theirs."""
    return select_device(name)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def torch_hub_weights_error(what: str, filename: str, url: str, err: BaseException, alternative: str = ""):
    """The one-line error for weights that torch.hub could not fetch into ``$TORCH_HOME/hub/checkpoints``."""
    from taylorseer.harness.diffusers_io import WeightsNotFoundError

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    return WeightsNotFoundError(
        f"{what} {filename} could not be loaded ({first_line(err)}); looked in {folder}. Offline: download {url} "
        f"where there is network into {folder} (or into $TORCH_HOME/hub/checkpoints with TORCH_HOME set){alternative}")
