"""What a run folder is: the settings that made its outputs, a lock, and one record per finished output.

A run folder must never report results of other settings: tables and sweeps are built from them. So:

* **Identity.** Every setting that can change an output is recorded in ``run.json`` before the first
  output is written, and checked when a run resumes into the folder. The identity is the whole resolved
  config *minus a deny-list* of settings known not to change an output (where results go, progress bars,
  batch size, ...), *plus* what some settings resolve to: the device type and dtype, a digest of the
  prompts' text (not the prompt file's path), a fingerprint of the weights (not their path). A setting an
  app adds later is therefore checked by default; forgetting to deny one costs a needless refusal, never a
  silently mixed folder. A mismatch is refused with one line naming the differing settings and the fix.
* **Lock.** One run at a time writes into a folder (an advisory ``flock`` held for the whole run).
* **Records.** Each finished output appends one JSON line to ``records/<writer>.jsonl`` (one file per
  writer, so data-parallel ranks never share a file). An output counts as done when its record exists and
  its files do; ``metrics.json`` is rebuilt from all records, so after a kill it still describes every
  output in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import detect
from .runs import slug, write_json

# Settings that cannot change an output, for every app. Settings that resolve to something else are
# denied here and their resolved value is put into the identity by the app (see ``identity``).
NOT_OUTPUT_CHANGING = (
    "out_root", "run_name", "progress", "warmup", "compare_uncached", "num_samples",
    "batch_size",     # sample i is a function of (seed, i) alone, except under a batch-wide schedule (BATCH_WIDE)
    "cpu_offload",    # diffusers' model offload moves whole models between uses; the arithmetic is the same
    "cache.offload",  # factors kept in host memory come back bit for bit (tested)
    "cache.prefetch",  # the same copies, on a side stream and earlier
    "device",         # -> device type
    "dtype",          # -> torch dtype
    "prompt", "prompt_file",  # -> digest of the prompts' text
    "model.path", "model.checkpoint", "model.ckpt_dir",  # -> fingerprint of the weights
)
# Schedules whose full/forecast decision is taken once for a whole batch (a probe over every sample): under them
# which samples share a batch changes the outputs, so the batch size and the number of ranks the samples are
# dealt to are in the identity.
BATCH_WIDE = ("adaptive",)
IDENTITY_FILE = "run.json"
BOOKKEEPING = {IDENTITY_FILE, "config.yaml", "metrics.json", ".metrics.lock", ".lock", "records"}


class RunFolderError(ValueError):
    """A run folder cannot be used with these settings; the message says why and what to do."""


def flatten(tree, prefix: str = "") -> dict:
    """``{"cache": {"interval": 3}}`` -> ``{"cache.interval": 3}`` (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def identity(config: dict, resolved: dict | None = None, ignore: Iterable[str] = (), ranks_per_generation: int = 1
             ) -> dict:
    """The identity of a run: ``config`` (a plain, resolved dict) minus the deny-list and ``ignore``
    (app-specific settings that cannot change an output), plus ``resolved`` values (flat keys).

    Under a batch-wide schedule the batch size and the number of data-parallel writers are in it too: the
    samples a writer batches together decide together. Context-parallel ranks of one generation
    (``ranks_per_generation``) decide as one process does, so only the generations count."""
    denied = set(NOT_OUTPUT_CHANGING) | set(ignore)
    flat = flatten(config)
    kept = {k: v for k, v in flat.items() if not any(k == d or k.startswith(d + ".") for d in denied)}
    if flat.get("cache.schedule") in BATCH_WIDE and flat.get("cache.enabled", True):
        if "batch_size" in flat:
            kept["batch_size"] = flat["batch_size"]
        kept["resolved.world_size"] = max(detect().world_size // max(ranks_per_generation, 1), 1)
    kept.update(resolved or {})
    return dict(sorted(kept.items()))


def digest(values) -> str:
    """A short, stable digest of JSON-able values (e.g. the list of prompts)."""
    text = json.dumps(values, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's whole content (first 16 hex digits), prefixed ``sha256:``.

    Every byte counts: a retrained or edited checkpoint of the same size is another model. Hashing 24 GB
    of FLUX weights takes minutes, so the hash is cached by (real path, size, mtime): a rerun reads no
    weight twice (:data:`FINGERPRINT_CACHE`; ``TAYLORSEER_CACHE_DIR`` moves it).
    """
    path = Path(path)
    real = str(path.resolve())
    stat = path.stat()
    key = [stat.st_size, stat.st_mtime_ns]
    cache_file = fingerprint_cache_file()
    cached = _read_fingerprint_cache(cache_file).get(real)
    if isinstance(cached, dict) and cached.get("stat") == key and isinstance(cached.get("hash"), str):
        return cached["hash"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    value = "sha256:" + h.hexdigest()[:16]
    _store_fingerprint(cache_file, real, {"stat": key, "hash": value})
    return value


def fingerprint_cache_file() -> Path:
    """Where weight hashes are cached: ``$TAYLORSEER_CACHE_DIR`` or ``$XDG_CACHE_HOME/taylorseer`` (``~/.cache``)."""
    root = os.environ.get("TAYLORSEER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taylorseer")
    return Path(root) / "fingerprints.json"


def _read_fingerprint_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_fingerprint(path: Path, real: str, entry: dict) -> None:
    """Best effort (a read-only home still runs, it only hashes again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        import fcntl

        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read_fingerprint_cache(path)
            data[real] = entry
            write_json(path, data)
    except OSError:
        pass


def folder_fingerprint(path: str | Path) -> str:
    """Fingerprint of a model folder (a diffusers pipeline): its configs' text and every weight file's fingerprint."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(root).as_posix()
        if f.suffix in (".json", ".txt", ".model", ".yaml"):
            h.update(rel.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"):
            h.update(rel.encode() + file_fingerprint(f).encode())
    return h.hexdigest()[:16]


def has_outputs(out_dir: str | Path) -> bool:
    """True when the folder holds anything besides bookkeeping files (an output of some earlier run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    return any(p.name not in BOOKKEEPING and not p.name.startswith(".") for p in out_dir.iterdir())


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_identity(out_dir: str | Path, ident: dict, skip: Iterable[str] = ()) -> None:
    """Refuse a folder whose outputs were made with other settings (one line naming them and the fix).

    ``skip`` leaves keys out of the comparison (an early check before the weights are loaded and
    fingerprinted; :meth:`RunFolder.open` checks everything).
    """
    out_dir = Path(out_dir)
    if not has_outputs(out_dir):
        return  # nothing there yet (or only bookkeeping of a run that failed before its first output)
    fix = f"choose another folder (run_name=<new name> or out_root=<dir>) or delete {out_dir}"
    path = out_dir / IDENTITY_FILE
    try:
        old = json.loads(path.read_text())["identity"]
    except FileNotFoundError:
        raise RunFolderError(f"{out_dir} holds outputs but no {IDENTITY_FILE} saying which settings made them "
                             f"(an older version wrote it): {fix}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RunFolderError(f"{path} is unreadable, so the outputs in {out_dir} cannot be matched to these "
                             f"settings: {fix}") from None
    keys = sorted((set(old) | set(ident)) - set(skip))
    changed = [k for k in keys if old.get(k, "<unset>") != ident.get(k, "<unset>")]
    if changed:
        details = "; ".join(f"{k}: {_describe(old.get(k, '<unset>'))} -> {_describe(ident.get(k, '<unset>'))}"
                            for k in changed[:6])
        more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
        raise RunFolderError(f"{out_dir} holds outputs made with other settings ({details}{more}): {fix}")


@dataclass
class RunFolder:
    """An opened run folder: identity checked and written, lock held until :meth:`close`."""

    path: Path
    ident: dict
    _lock: object = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, ident: dict, lock: bool = True) -> RunFolder:
        """Check ``ident`` against the folder, take its lock, write ``run.json``.

        Call it after everything that can fail on bad settings or missing weights, right before the first
        output: a run that failed earlier leaves nothing that would block its corrected rerun.
        """
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"cannot create the run folder {path}: {err.strerror} (set out_root=<a folder you "
                                 f"can write>)") from err
        handle = _take_lock(path) if lock else None
        try:
            check_identity(path, ident)
            write_json(path / IDENTITY_FILE, {"identity": ident})
            if handle is not None:
                remove_debris(path)
        except BaseException:
            if handle is not None:
                handle.close()
            raise
        return cls(path, ident, handle)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_debris(path: Path) -> None:
    """Delete the temporary files of writers killed mid-write (``.tmp-*``, :func:`.runs.atomic_write`): with the
    folder's lock held nobody else is writing, so they are no one's; left there they look like outputs."""
    for debris in path.rglob(".tmp-*"):
        try:
            if debris.is_file():
                debris.unlink()
        except OSError:
            pass


def claim(path: str | Path, ident: dict, session) -> RunFolder | None:
    """:meth:`RunFolder.open` for data-parallel runs: rank 0 checks the identity and holds the lock, every
    rank of ``session`` (a :class:`taylorseer.harness.distributed.Session`) learns the outcome, so a refusal stops
    them all with the same one line. Returns the folder on rank 0, None elsewhere."""
    folder, error = None, None
    if session.is_main:
        try:
            folder = RunFolder.open(path, ident)
        except ValueError as err:
            error = str(err)
    error = session.broadcast(error)
    if error is not None:
        raise RunFolderError(error)
    return folder


def _take_lock(path: Path):
    import fcntl

    handle = open(path / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"another run ({owner}) is writing into {path} right now: wait for it to finish, or "
                             f"give this run its own folder (run_name=<new name>)") from None
    except OSError:  # a file system without flock (some network mounts): run unlocked rather than not at all
        return handle
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
    handle.flush()
    return handle


class Records:
    """Append-only per-output records: ``records/<writer>.jsonl``, merged over every writer on read.

    ``key`` names the field that identifies an output (e.g. ``"index"`` or ``"file"``). A line torn by a
    kill is skipped; a later record of the same key wins.
    """

    def __init__(self, out_dir: str | Path, writer: str = "main", key: str = "index"):
        self.dir = Path(out_dir) / "records"
        self.path = self.dir / f"{writer}.jsonl"
        self.key = key

    def append(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> dict:
        """Every record of every writer, by key."""
        out: dict = {}
        for path in sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else ():
            for record in _read_lines(path):
                if self.key in record:
                    out[record[self.key]] = record
        return out

    def done(self, files_of) -> dict:
        """The records whose output files all exist and are intact (:func:`output_ok`); ``files_of(record)``
        lists a record's files (relative). A damaged output is not done: the run makes it again."""
        root = self.dir.parent
        return {k: r for k, r in self.load().items() if all(output_ok(root / f) for f in files_of(r))}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def output_ok(path: Path) -> bool:
    """An output file that exists, is not empty, and (an image) decodes: PIL checks a PNG's chunk CRCs, so a
    truncated or overwritten image is caught; other files (videos) must be non-empty."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
    except OSError:
        return False
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return True
    try:
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means the file is damaged
        return False


def _read_lines(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a writer killed mid-write
            if isinstance(record, dict):
                yield record


def prompts_label(prompts: list[str], prompt_file: str | None = None) -> str:
    """The part of a default run-folder name that says which prompts: the prompt file's stem or the first
    prompt's slug, and 6 hex digits of the prompts' text, so two prompt sets never share a default folder."""
    label = Path(prompt_file).stem if prompt_file else slug(prompts[0], 24)
    return f"{slug(label, 24)}-{digest(prompts)[:6]}"
