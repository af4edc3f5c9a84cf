"""FID (Heusel et al. 2017, eq. 6) with pytorch-fid: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

The arithmetic is pytorch-fid's ``calculate_frechet_distance``; the features are pytorch-fid's
``InceptionV3`` pool3 activations (2048-d; the TF 2015-12-05 Inception weights ported to PyTorch,
``pt_inception-2015-12-05-6726825d.pth``), images scaled to [0, 1], resized to 299x299 bilinearly
(``F.interpolate``, align_corners=False) and mapped to [-1, 1] inside the network. The digits model
uses its classifier's features instead (``TaylorSeer-DiT/demo.py``) through :func:`frechet_distance`.

    bash scripts/eval.sh fid runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .media import npz_keys
from .sources import ImageSource, cached_reference, feature_pass, image_source, resolve_device, torch_hub_weights_error

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
DEFINITION = "FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), pytorch-fid arithmetic"


def statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features for FID statistics, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_from_statistics(mu1, s1, mu2, s2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    # identical sets give a tiny negative number from the matrix square root's rounding
    return max(float(calculate_frechet_distance(mu1, s1, mu2, s2)), 0.0)


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """FID between feature sets ``a`` and ``b`` (rows are samples)."""
    return frechet_from_statistics(*statistics(a), *statistics(b))


def load_inception(dims: int = 2048, device: torch.device | str = "cpu") -> torch.nn.Module:
    """pytorch-fid's InceptionV3 returning the ``dims``-d block; one clear error when its weights cannot be had."""
    from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise ValueError(f"dims={dims} is invalid: pytorch-fid offers {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}")
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except Exception as err:  # URLError / HTTPError / a truncated file: the weights are not here
        raise torch_hub_weights_error("pytorch-fid's Inception weights", FID_WEIGHTS, FID_WEIGHTS_URL, err) from err
    return model.eval().to(device)


def pool_extractor(model: Callable) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """uint8 NCHW -> {"pool": (N, D)}: the [0, 1] floats pytorch-fid's network takes, its first block."""

    def extract(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(x.float() / 255.0)[0]
        return {"pool": out.reshape(out.shape[0], -1)}

    return extract


def reference_statistics(reference: str | Path, extract: Callable, feature_id: str, batch_size: int,
                         device: torch.device, use: str = "images") -> dict:
    """(mu, sigma) of the reference and where they came from.

    ``use="images"``: statistics of the reference's images (an ``.npz``'s ``arr_0`` or a folder), cached
    beside it; ``use="statistics"``: the ``mu``/``sigma`` stored in the ``.npz`` (ADM's reference batches
    carry the TF statistics of the whole training set there).
    """
    reference = Path(reference).expanduser()
    keys = npz_keys(reference) if reference.is_file() and reference.suffix == ".npz" else []
    has_stats = {"mu", "sigma"} <= set(keys)
    if use == "statistics" or (has_stats and "arr_0" not in keys):
        if not has_stats:
            raise ValueError(f"{reference} holds no mu/sigma statistics ({keys}); use --ref-use images")
        with np.load(reference) as stats:
            return dict(mu=stats["mu"].astype(np.float64), sigma=stats["sigma"].astype(np.float64),
                        kind="statistics (mu, sigma) stored in the reference", num_items=None, cache=None)
    if use != "images":
        raise ValueError(f"--ref-use {use!r} is invalid: expected images or statistics")
    source = image_source(reference)

    def compute():
        feats = feature_pass(source, extract, batch_size, device, f"FID reference {reference.name}")["pool"]
        mu, sigma = statistics(feats)
        return {"mu": mu, "sigma": sigma, "num_items": np.array(len(feats))}

    stats, cache = cached_reference(source, f"fid-{feature_id}", compute)
    return dict(mu=stats["mu"], sigma=stats["sigma"], kind=f"statistics of the images {source.description}",
                num_items=int(stats["num_items"]), cache=str(cache))


def compute_fid(run: str | Path, reference: str | Path, batch_size: int = 50, device: str = "auto", dims: int = 2048,
                ref_use: str = "images", model: Callable | None = None, feature_id: str | None = None) -> dict:
    """FID of the images of ``run`` (run folder, image folder or ``.npz``) against ``reference``.

    ``model`` replaces pytorch-fid's network (same call: [0, 1] NCHW floats -> [(N, D, 1, 1)]); it then
    needs a ``feature_id`` that names it in the reference cache.
    """
    import pytorch_fid

    dev = resolve_device(device)
    source: ImageSource = image_source(run)
    if not Path(reference).expanduser().exists():
        raise FileNotFoundError(f"--ref {reference} does not exist: pass an .npz (arr_0 images or mu/sigma) or a "
                                f"folder of reference images")
    if model is None:
        model, feature_id = load_inception(dims, dev), f"pytorch-fid-{pytorch_fid.__version__}-pool{dims}"
        network = (f"pytorch-fid {pytorch_fid.__version__} InceptionV3 ({FID_WEIGHTS}), {dims}-d block, inputs "
                   f"resized to 299x299 with F.interpolate(bilinear, align_corners=False)")
    elif not feature_id:
        raise ValueError("a custom FID feature model needs a feature_id (it names the reference statistics cache)")
    else:
        network = feature_id
    extract = pool_extractor(model)
    ref = reference_statistics(reference, extract, feature_id, batch_size, dev, ref_use)
    feats = feature_pass(source, extract, batch_size, dev, f"FID {source.path.name}")["pool"]
    mu, sigma = statistics(feats)
    if mu.shape != ref["mu"].shape:
        raise ValueError(f"feature sizes differ: {mu.shape[0]} here, {ref['mu'].shape[0]} in the reference "
                         f"statistics {reference}: they come from another network/block")
    return {
        "fid": frechet_from_statistics(mu, sigma, ref["mu"], ref["sigma"]),
        "num_items": int(len(feats)),
        "source": source.description,
        "reference": str(Path(reference).expanduser()),
        "reference_kind": ref["kind"],
        "reference_num_items": ref["num_items"],
        "reference_cache": ref["cache"],
        "feature_extractor": network,
        "definition": DEFINITION,
    }
