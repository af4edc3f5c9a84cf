"""Metrics of the bundled digits model's runs: the same two questions as the demo, over run folders.

Fidelity to the uncached samples of the same seeds (PSNR per sample, FID between the two sets in the
bundled classifier's 128-d feature space) and absolute quality (the classifier's accuracy on each
sample's intended class, digits FID against the 1797 real digits). Read from the saved 8-bit PNGs.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from taylorseer.harness.runfolder import Records

from .fid import frechet_distance
from .fidelity import finite_mean, psnr
from .rundir import RunFolder, pair_items, reference_items


def _load(items) -> torch.Tensor:
    """(N, 1, 8, 8) floats in [0, 1]. Larger digits (the FLUX digits model's 16x16) are averaged down over
    blocks, the inverse of how its training images were made from the 8x8 ones."""
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(i.path).convert("L"), dtype=np.float32) / 255)
                          for i in items]).unsqueeze(1)
    if images.shape[-1] != 8:
        images = torch.nn.functional.avg_pool2d(images, kernel_size=images.shape[-1] // 8)
    return images


def _label(record: dict) -> int | None:
    """The intended digit: recorded by the DiT apps, named by the prompt in FLUX runs ("digit 7")."""
    if "label" in record:
        return record["label"]
    if "prompt" in record:
        from taylorseer_flux.digits import label_of

        try:
            return label_of(record["prompt"])
        except ValueError:
            return None
    return None


def compute_digits(run: RunFolder, reference=None) -> dict:
    from taylorseer_dit.digits import load_classifier, load_split

    classifier = load_classifier()
    labels = {r["index"]: _label(r) for r in Records(run.path).load().values()}
    labels = {k: v for k, v in labels.items() if v is not None}
    missing = [i.key for i in run.items if i.index not in labels]
    if missing:
        raise ValueError(f"{run.path}: no class label recorded for item(s) {missing[:5]}: the digits metric reads "
                         f"runs of taylorseer_dit.sample_ddp model=digits or taylorseer_flux.sample "
                         f"model=digits_flux (prompts 'digit 0'..'digit 9')")
    images = _load(run.items)
    data = load_split()
    with torch.no_grad():
        features = classifier.features(images * 2 - 1)
        predicted = classifier(images * 2 - 1).argmax(1)
        real = classifier.features(torch.cat([data["train_x"], data["test_x"]]))
    target = torch.tensor([labels[i.index] for i in run.items])
    out = {
        "num_items": len(run.items),
        "accuracy": float((predicted == target).float().mean()),
        "fid_vs_real": frechet_distance(features, real),
        "definition": "bundled digits classifier (assets/digits_classifier.pt): accuracy on the recorded class; "
                      "FID in its 128-d feature space; PSNR on [0, 1] pixels (identical = 100 dB)",
    }
    if reference is not None:
        ref_path, ref_items = reference_items(run, reference)
        pairs, unmatched = pair_items(run.items, ref_items)
        for a, b in pairs:  # PSNR after averaging a larger image down would compare two different things
            with Image.open(a.path) as x, Image.open(b.path) as y:
                if x.size != y.size:
                    raise ValueError(f"{a.path.name} is {x.size[0]}x{x.size[1]} but its reference {b.path} is "
                                     f"{y.size[0]}x{y.size[1]}: the reference must be of the same model and size")
        mine, theirs = _load([a for a, _ in pairs]), _load([b for _, b in pairs])
        with torch.no_grad():
            mine_features, ref_features = classifier.features(mine * 2 - 1), classifier.features(theirs * 2 - 1)
        out.update(reference=str(ref_path), num_unmatched=len(unmatched),
                   psnr_vs_uncached=finite_mean(psnr(mine, theirs)),
                   fid_vs_uncached=frechet_distance(mine_features, ref_features))
    return out
