"""Loading diffusers pipelines and reading prompts, with errors that say how to fix them.

Shared by TaylorSeer-FLUX and TaylorSeer-HunyuanVideo: the real weights come through the same
``from_pretrained`` call that the tests exercise on tiny pipelines saved to a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.config import CacheConfig
from .runfolder import folder_fingerprint, prompts_label
from .runs import WeightsNotFoundError  # noqa: F401 - re-exported: the apps catch it from here


def dtype_keyword() -> str:
    """``from_pretrained``'s keyword for the weights' dtype: diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` (the
    old name warns there); older versions take ``torch_dtype`` only."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(pipeline_cls, source: str, accept: tuple[str, ...] = (), dtype=None, **kwargs):
    """``pipeline_cls.from_pretrained(source, **kwargs)`` with one clear error when it cannot load.

    ``dtype`` (a ``torch.dtype``) is passed under the keyword this diffusers version takes (:func:`dtype_keyword`).

    ``source`` is a hub id (``black-forest-labs/FLUX.1-dev``) or a local folder in the same layout. A local
    folder of another pipeline (its ``model_index.json`` names the class) is refused before anything loads;
    ``accept`` lists further class names that load as ``pipeline_cls`` (e.g. schnell's FluxPipeline folders).
    """
    looks_local = source.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(source))
    if looks_local:
        path = Path(source).expanduser()
        if not (path / "model_index.json").is_file():
            raise WeightsNotFoundError(
                f"no diffusers pipeline at {path} (expected {path / 'model_index.json'}). Download one with "
                f"`huggingface-cli download <repo> --local-dir {path}` or pass the hub id instead."
            )
        try:
            found = json.loads((path / "model_index.json").read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as err:
            raise WeightsNotFoundError(f"{path / 'model_index.json'} is not a diffusers model index: {err}") from err
        if found not in (pipeline_cls.__name__, *accept):
            raise WeightsNotFoundError(f"{path} holds a {found} but this app loads a {pipeline_cls.__name__}: point "
                                       f"model.path at a {pipeline_cls.__name__} folder (or use the app for {found})")
        source = str(path)
    if dtype is not None:
        kwargs[dtype_keyword()] = dtype
    try:
        return pipeline_cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if looks_local:
            raise WeightsNotFoundError(f"the pipeline folder {source} is incomplete or corrupt: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise WeightsNotFoundError(
            f"could not load {source!r} from the Hugging Face hub{' (HF_HUB_OFFLINE=1)' if offline else ''}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
            f"How to fix: if the repository is gated (FLUX.1-dev is), accept its licence on "
            f"https://huggingface.co/{source} and run `huggingface-cli login`; without network on this "
            f"machine, run `huggingface-cli download {source} --local-dir DIR` where there is network and "
            f"pass model.path=DIR."
        ) from err


def weights_fingerprint(source: str) -> str:
    """What identifies the weights behind ``source`` in a run folder's identity: a fingerprint of the local
    folder, or of the hub snapshot it was loaded from (cached locally after loading), else the hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_fingerprint(path)
    try:
        from huggingface_hub import snapshot_download

        return folder_fingerprint(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - no snapshot on disk (e.g. loaded some other way): the id is what we know
        return f"hub:{source}"


def content_fingerprint(weights: str | None) -> str | None:
    """``weights`` (a :func:`weights_fingerprint`) when it fingerprints the weights' content; None for a bare hub id,
    which names the weights but does not pin them (known only once a run loaded them)."""
    return None if weights is None or weights.startswith("hub:") else weights


def read_prompts(prompt: str | list[str] | None = None, prompt_file: str | None = None) -> list[str]:
    """Prompts from the command line (a string or a list) or a text file with one per line.

    The file is read as text files are: UTF-8 with or without a byte-order mark (the mark is not part of the
    first prompt), any line ending. Blank lines and lines whose first non-blank character is ``#`` (comments)
    are skipped; a prompt that must start with ``#`` cannot be given in a file (pass it as prompt=...).
    """
    if prompt_file:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt_file={prompt_file!r} does not exist (give a text file with one prompt per line)")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"prompt_file={prompt_file!r} is not UTF-8 text: {err}") from err
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"prompt_file={prompt_file!r} holds no prompts (one per line; '#' starts a comment)")
        return prompts
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError("no prompt given: pass prompt='a photo of a cat' or prompt_file=prompts.txt")
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    if not prompts:
        raise ValueError("prompt=[] holds no prompt: pass prompt='a photo of a cat' or prompt_file=prompts.txt")
    if not all(p.strip() for p in prompts):
        raise ValueError(f"empty prompt in {prompts!r}")
    return prompts


def run_folder_parts(cfg) -> tuple[str, str]:
    """What a diffusers app's default run folder name carries besides sizes: the cache tag (``-diffusers`` for
    diffusers' own hook) and the prompts' label (prompt file stem or first prompt, and a digest of the text)."""
    from omegaconf import OmegaConf


    cache_config = CacheConfig.from_dict(OmegaConf.to_container(cfg.cache, resolve=True))
    tag = cache_config.tag + ("-diffusers" if cfg.cache_impl == "diffusers" and cache_config.enabled else "")
    prompts = read_prompts(OmegaConf.to_container(cfg, resolve=True)["prompt"], cfg.prompt_file)
    return tag, prompts_label(prompts, cfg.prompt_file)
