"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): ``100 * max(cos(E_image, E_text), 0)``
per image, averaged over the run.

The model is ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K`` by default, the CLIP that cache-dit's DrawBench
tables for FLUX.1-dev use (its baseline 32.92 sits next to TaylorSeer's 32.40); torchmetrics' default
``openai/clip-vit-large-patch14`` is one option away (``--clip-model``). Loaded with transformers'
``CLIPModel``/``CLIPProcessor.from_pretrained`` (hub id or a local folder in the same layout): images
resized (shortest side, bicubic) and centre-cropped to the model's size, prompts truncated to its 77
tokens. Embeddings are ``get_image_features`` / ``get_text_features`` (the projected, pre-normalisation
embeddings) and the cosine is taken in float64.

    bash scripts/eval.sh clip runs/flux/<run> [--clip-model openai/clip-vit-large-patch14]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from taylorseer.harness.diffusers_io import WeightsNotFoundError

from .media import load_image
from .rundir import RunFolder
from .sources import resolve_device

DEFAULT_MODEL = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
DEFINITION = "CLIP score = 100 * max(cos(image embedding, text embedding), 0), mean over images (torchmetrics)"


def load_clip(source: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, processor) from a hub id or a local folder; one clear error when it cannot be had."""
    from transformers import CLIPModel, CLIPProcessor

    local = source.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(source))
    path = str(Path(source).expanduser()) if local else source
    if local and not (Path(path) / "config.json").is_file():
        raise WeightsNotFoundError(f"no CLIP model at {path} (expected {path}/config.json): download one with "
                                   f"`huggingface-cli download {DEFAULT_MODEL} --local-dir {path}` or pass a hub id")
    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype)
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsNotFoundError(
            f"could not load the CLIP model {source!r} ({type(err).__name__}: {first[:200]}); looked in "
            f"{'the folder' if local else f'the Hugging Face cache {hf_home} and the hub'}. Offline: run "
            f"`huggingface-cli download {source if not local else DEFAULT_MODEL} --local-dir DIR` where there is "
            f"network and pass --clip-model DIR (or copy the cache and set HF_HOME, HF_HUB_OFFLINE=1)") from err
    return model.eval().to(device), processor


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output for get_*_features; 4.x returned the tensor itself
    return output if torch.is_tensor(output) else output.pooler_output


@torch.inference_mode()
def clip_scores(model, processor, images: list[np.ndarray], prompts: list[str], device: torch.device) -> np.ndarray:
    """Per-pair CLIP scores ``100 * max(cos, 0)`` of (H, W, 3) uint8 images and their prompts."""
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    image = _features(model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype))).double()
    text = _features(model.get_text_features(input_ids=inputs["input_ids"],
                                             attention_mask=inputs.get("attention_mask"))).double()
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    return (100 * cos.clamp(min=0)).cpu().numpy()


def compute_clip_score(run: RunFolder, model_name: str = DEFAULT_MODEL, batch_size: int = 16, device: str = "auto",
                       prompts: dict[str, str] | None = None) -> dict:
    """CLIP score of every item of ``run`` with its recorded prompt (``prompts`` overrides, by item key)."""
    prompts = prompts or {}
    missing = [i.key for i in run.items if i.prompt is None and i.key not in prompts]
    if missing:
        raise ValueError(f"{run.path}: items {missing[:3]} have no prompt in metrics.json; CLIP score needs the "
                         f"prompt of every image (pass a run folder written by scripts/sample_flux.sh)")
    dev = resolve_device(device)
    model, processor = load_clip(model_name, dev)
    per_item = {}
    for start in tqdm(range(0, len(run.items), batch_size), desc="CLIP score", unit="batch", leave=False):
        batch = run.items[start:start + batch_size]
        scores = clip_scores(model, processor, [load_image(i.path) for i in batch],
                             [prompts.get(i.key, i.prompt) for i in batch], dev)
        per_item.update({i.key: float(s) for i, s in zip(batch, scores, strict=True)})
    values = np.array(list(per_item.values()))
    return {"clip_score": float(values.mean()), "clip_score_std": float(values.std()), "num_items": len(values),
            "model": model_name, "definition": DEFINITION, "per_item": per_item}
