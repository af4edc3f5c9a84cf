"""Run folders as the metric commands read them: items from ``metrics.json``, else the images found there.

A sampling app writes ``metrics.json`` with ``items: [{index, prompt, seed, file, ...}]`` (``file`` relative
to the folder). Metrics read the items from there and never from file-name conventions; only a folder
without items (images copied from elsewhere) falls back to globbing its images, sorted by name. Paired
metrics match a run with its reference by item index and check that the seeds (and prompts) agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from taylorseer.harness.runs import read_json

from .media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

# Files a folder may hold that are not outputs: DiT's sample.py writes a contact sheet beside the images.
SKIP = {"grid.png"}


class NotARunFolderError(ValueError):
    """The path is not a folder of outputs a metric can read; the message says what was expected."""


@dataclass(frozen=True)
class Item:
    """One output of a run: its file (absolute), and the index/seed/prompt the sampling app recorded.

    ``key`` names the item in results: its index where indices are unique in the run (FLUX, DiT), else
    its file name (HunyuanVideo numbers the videos of each prompt 0..4).
    """

    path: Path
    index: int | None = None
    seed: int | None = None
    prompt: str | None = None
    key: str = ""


def _keyed(items: list[Item], root: Path) -> list[Item]:
    indices = [i.index for i in items]
    unique = None not in indices and len(set(indices)) == len(indices)
    return [replace(i, key=str(i.index) if unique else str(i.path.relative_to(root))) for i in items]


@dataclass
class RunFolder:
    path: Path
    items: list[Item]
    metrics: dict = field(default_factory=dict)
    items_from: str = "metrics.json"  # or "glob"

    @property
    def name(self) -> str:
        return self.path.name


def open_run(path: str | Path, media: str = "image") -> RunFolder:
    """The run folder at ``path`` with its items; ``media`` is "image", "video" or "any"."""
    path = Path(path).expanduser()
    suffixes = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES, "any": IMAGE_SUFFIXES + VIDEO_SUFFIXES}[media]
    if not path.is_dir():
        raise NotARunFolderError(f"{path} is not a run folder (no such folder); pass a folder written by "
                                 f"scripts/sample_*.sh, e.g. runs/flux/<run name>")
    metrics = read_json(path / "metrics.json") or {}
    records = metrics.get("items")
    if not records and (path / "records").is_dir():
        # Runs too large to list their items in metrics.json (DiT FID: 50,000 samples) keep them in records/.
        from taylorseer.harness.runfolder import Records

        records = [r for _, r in sorted(Records(path).done(lambda r: [r["file"]]).items(), key=lambda kv: str(kv[0]))]
    if records:
        items = [Item(path / r["file"], r.get("index"), r.get("seed"), r.get("prompt")) for r in records
                 if isinstance(r, dict) and r.get("file")]
        wrong = [i for i in items if i.path.suffix.lower() not in suffixes]
        if wrong:
            raise NotARunFolderError(f"{path}: metrics.json lists {wrong[0].path.name}, not a file of the kind this "
                                     f"metric reads ({', '.join(suffixes)}): wrong metric for this run?")
        missing = [i for i in items if not i.path.is_file()]
        if missing:
            raise NotARunFolderError(f"{path}: {len(missing)} of the {len(items)} outputs listed in metrics.json are "
                                     f"missing (e.g. {missing[0].path.name}); finish the run (rerun its sampling "
                                     f"command, it resumes) or remove the folder")
        return RunFolder(path, _keyed(sorted(items, key=_order), path), metrics, "metrics.json")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes and p.name not in SKIP)
    if not files:
        raise NotARunFolderError(f"{path} is not a run folder: no metrics.json with items and no {media} files "
                                 f"({', '.join(suffixes)}) in it; pass a folder written by scripts/sample_*.sh")
    return RunFolder(path, _keyed([Item(p) for p in files], path), metrics, "glob")


def _order(item: Item):
    return (item.index is None, item.index if item.index is not None else 0, item.path.name)


def reference_items(run: RunFolder, reference: str | Path | None) -> tuple[Path, list[Item]]:
    """The reference outputs for ``run``: another run folder, or ``<run>/uncached`` (``compare_uncached=true``)
    holding the same file names. With ``reference=None`` the ``uncached/`` subfolder is used when present."""
    if reference is None:
        if not (run.path / "uncached").is_dir():
            raise ValueError(f"{run.path} has no uncached/ folder: pass --reference <run folder of the uncached "
                             f"images of the same seeds> (e.g. the same settings with cache=none)")
        reference = run.path / "uncached"
    reference = Path(reference).expanduser()
    if reference.resolve() == (run.path / "uncached").resolve() and not (reference / "metrics.json").is_file():
        items = [Item(reference / i.path.relative_to(run.path), i.index, i.seed, i.prompt, i.key) for i in run.items]
        missing = [i for i in items if not i.path.is_file()]
        if missing:
            raise NotARunFolderError(f"{reference}: {len(missing)} uncached twins are missing "
                                     f"(e.g. {missing[0].path.name})")
        return reference, items
    check_reference(run.path, reference)
    return reference, open_run(reference, "any").items


def completeness(path: str | Path, partial: bool = False, what: str = "run") -> dict:
    """Whether the run folder at ``path`` holds every output its run was asked for. A metric over an
    incomplete run would judge whatever happens to be there: it is refused in one line, or with
    ``partial=True`` computed and marked (``{"partial": True, "num_items_expected": n}``). A path that is no
    run folder of this project (an image folder, an .npz) has nothing to check: ``{}``."""
    path = Path(path).expanduser()
    if not path.is_dir() or not ((path / "run.json").is_file() or (path / "records").is_dir()):
        return {}
    metrics = read_json(path / "metrics.json")
    if metrics is None:
        have, expected = "no metrics.json", None
    elif metrics.get("complete") is False:
        have, expected = f"{metrics.get('num_items', '?')} of its {metrics.get('num_samples', '?')}", \
            metrics.get("num_samples")
    else:
        return {}
    if not partial:
        raise NotARunFolderError(f"{what} {path} is incomplete ({have} outputs): finish it (rerun its sampling "
                                 f"command, it resumes) or pass --partial to compute on what is there, marked partial")
    return {"partial": True, "num_items_expected": expected}


# What a reference run must share with the run it is compared with (run.json identity keys; a prefix ends in
# "."). The cache settings and the step count may differ: that is what a comparison measures.
SAME_AS_REFERENCE = ("model.", "resolved.weights", "resolved.checkpoint", "resolved.architecture", "resolved.vae",
                     "height", "width", "num_frames", "seed", "resolved.prompts", "class_labels", "resolved.image",
                     "num_images_per_prompt", "videos_per_prompt")
NOT_COMPARED = ("model.num_steps", "model.default_prompt", "model.guidance_scale")


def check_reference(run_path: str | Path, ref_path: str | Path) -> None:
    """Refuse a reference run made with another model, size or seed set, in one line naming the first
    difference (both folders' ``run.json``; folders without one are not checked)."""
    run_ident = (read_json(Path(run_path) / "run.json") or {}).get("identity")
    ref_ident = (read_json(Path(ref_path) / "run.json") or {}).get("identity")
    if not isinstance(run_ident, dict) or not isinstance(ref_ident, dict):
        return
    for key in sorted(set(run_ident) | set(ref_ident)):
        if key in NOT_COMPARED or not any(key == k or (k.endswith(".") and key.startswith(k))
                                          for k in SAME_AS_REFERENCE):
            continue
        if key in run_ident and key in ref_ident and run_ident[key] != ref_ident[key]:
            raise NotARunFolderError(f"the reference {ref_path} is not the same model, size and seeds as {run_path}: "
                                     f"{key} is {ref_ident[key]!r} there and {run_ident[key]!r} here; pass the "
                                     f"uncached run of the same settings")


def _match_key(items: list[Item]):
    """How to match items across runs: by index where unique, by (prompt, index), else by file name."""
    indices = [i.index for i in items]
    if None not in indices and len(set(indices)) == len(indices):
        return lambda i: i.index, "index"
    if None not in indices and all(i.prompt is not None for i in items):
        return lambda i: (i.prompt, i.index), "prompt and index"
    return lambda i: i.path.name, "file name"


def pair_items(items: list[Item], reference: list[Item]) -> tuple[list[tuple[Item, Item]], list[Item]]:
    """Pairs (output, reference output) matched by index (by prompt and index, or by file name, where the
    indices do not name the items), and the outputs that have no reference. Seeds and prompts must agree:
    a pair that differs is not a twin."""
    mine, how = _match_key(items)
    theirs, how_ref = _match_key(reference)
    if how != how_ref:
        raise ValueError(f"the run names its outputs by {how} but the reference by {how_ref}: not comparable runs")
    lookup = {theirs(r): r for r in reference}
    pairs, unmatched = [], []
    for item in items:
        twin = lookup.get(mine(item))
        if twin is None:
            unmatched.append(item)
            continue
        for what in ("seed", "prompt"):
            a, b = getattr(item, what), getattr(twin, what)
            if a is not None and b is not None and a != b:
                raise ValueError(f"item {item.key}: {what} {a!r} here but {b!r} in the reference ({twin.path}); "
                                 f"the reference must be the same items sampled without the cache")
        pairs.append((item, twin))
    if not pairs:
        raise ValueError(f"no output matches the reference by {how}: is it the uncached run of the same prompts "
                         f"and seeds?")
    return pairs, unmatched
