"""Writing and reading the mp4 files, named the way VBench expects.

VBench finds a video by its prompt: ``{prompt}-{index}.mp4``, the prompt text itself as the file name and
index 0..4 for the five seeds. Prompts are therefore written verbatim whenever the file system allows it;
all 946 prompts of VBench's own list are (tested against the list's shape of text). A prompt that cannot be
a file name as it is (a path separator, a control character such as a newline, leading or trailing
spaces, a leading dot, or a name over the 255-byte limit) is cleaned and gets ``~`` and 8 hex digits of
its text's SHA-256 before ``-{index}``: two different prompts never share a file, and a prompt that
differs only in what was cleaned (``a/b cat`` vs ``a_b cat``, ``cat `` vs ``cat``) keeps its own video.
Two prompts that differ only in letter case also get the suffix, so the folder survives a copy to a
case-insensitive file system. Every name is decided before the first video is sampled; ``prompts.json``
in the run folder maps each file back to its exact prompt (VBench's ``custom_input`` mode, which reads
prompts from file names, should be given that map's prompts).

Encoding goes through imageio's FFMPEG plugin with the ffmpeg binary that ``imageio-ffmpeg`` ships
(H.264, yuv420p), so no system ffmpeg is needed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from taylorseer.harness.runs import atomic_write

MAX_NAME_BYTES = 255  # ext4/xfs/NTFS limit for one file name
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def _verbatim_ok(prompt: str, tail: str) -> bool:
    return (bool(prompt) and not _UNSAFE.search(prompt) and prompt == prompt.strip() and not prompt.startswith(".")
            and len((prompt + tail).encode("utf-8")) <= MAX_NAME_BYTES)


def _hashed(prompt: str, tail: str) -> str:
    """The cleaned prompt, cut to fit, then ``~<sha256[:8]>`` (of the exact prompt) and ``tail``."""
    tag = "~" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8]
    name = re.sub(r"\s+", " ", _UNSAFE.sub("_", prompt)).strip().lstrip(".")
    budget = MAX_NAME_BYTES - len((tag + tail).encode("utf-8"))
    name = name.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip()  # cut on a character boundary
    return f"{name}{tag}{tail}"


def video_filename(prompt: str, index: int, suffix: str = ".mp4") -> str:
    """``{prompt}-{index}.mp4`` when the prompt is a valid file name as it is, else the hashed form."""
    tail = f"-{index}{suffix}"
    return prompt + tail if _verbatim_ok(prompt, tail) else _hashed(prompt, tail)


def video_filenames(prompts: Iterable[str], per_prompt: int, suffix: str = ".mp4") -> dict[tuple[str, int], str]:
    """File names of every (prompt, index) of a run, all distinct (also ignoring letter case).

    Raises ValueError, before anything is sampled, in the (astronomically unlikely) case that two prompts
    still share a name.
    """
    prompts = list(dict.fromkeys(prompts))
    first = {}
    for prompt in prompts:
        first.setdefault(video_filename(prompt, 0, suffix).casefold(), []).append(prompt)
    names, seen = {}, {}
    for prompt in prompts:
        clash = len(first[video_filename(prompt, 0, suffix).casefold()]) > 1
        for i in range(per_prompt):
            tail = f"-{i}{suffix}"
            name = _hashed(prompt, tail) if clash else video_filename(prompt, i, suffix)
            if name.casefold() in seen:
                raise ValueError(f"prompts {seen[name.casefold()]!r} and {prompt!r} would share the file {name!r}; "
                                 f"make them differ in more than letter case or white space")
            seen[name.casefold()] = prompt
            names[(prompt, i)] = name
    return names


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
