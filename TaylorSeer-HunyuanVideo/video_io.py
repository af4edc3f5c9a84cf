"""Writing and reading the mp4 files, named the way VBench expects.

VBench looks videos up by prompt: ``{prompt}-{index}.mp4`` with the prompt text itself as the file
name and index 0..4 for the five seeds. The prompt is therefore kept verbatim, changed only where a
file system forces it (path separators, NUL, the 255-byte name limit).

Encoding goes through imageio's FFMPEG plugin with the ffmpeg binary that ``imageio-ffmpeg`` ships
(H.264, yuv420p), so no system ffmpeg is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from taylorseer.runs import atomic_write

MAX_NAME_BYTES = 255  # ext4/xfs/NTFS limit for one file name


def video_filename(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """``{prompt}-{index}.mp4`` (VBench), with ``/`` and NUL replaced and the name cut to 255 bytes."""
    name = prompt.replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    tail = f"-{index}{suffix}"
    budget = MAX_NAME_BYTES - len(tail.encode())
    encoded = name.encode("utf-8")
    if len(encoded) > budget:
        # Cut at a character boundary so the name stays valid UTF-8.
        name = encoded[:budget].decode("utf-8", errors="ignore").rstrip()
    return f"{name or 'empty'}{tail}"


def to_uint8(frames) -> np.ndarray:
    """(F, H, W, 3) uint8 from the pipeline's ``output_type="np"`` floats in [0, 1] (or uint8 already)."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected video frames shaped (frames, height, width, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_mp4(path: str | Path, frames, fps: float, quality: float | None = 5.0) -> Path:
    """Encode ``frames`` (F, H, W, 3) to an H.264 mp4, atomically (a killed run leaves no partial file).

    ``quality`` is imageio's 0-10 scale (5 is its default; higher is better); None lets ffmpeg choose.
    """
    import imageio.v2 as imageio

    video = to_uint8(frames)
    height, width = video.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs an even frame size, got {height}x{width}")

    def write(tmp: Path) -> None:
        # macro_block_size=2: never resize (imageio's default 16 would rescale sizes not divisible by 16).
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                pixelformat="yuv420p", macro_block_size=2) as writer:
            for frame in video:
                writer.append_data(frame)

    return atomic_write(path, write)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as (F, H, W, 3) uint8."""
    import imageio.v2 as imageio

    with imageio.get_reader(Path(path), format="FFMPEG") as reader:
        return np.stack([np.asarray(frame) for frame in reader])
