"""Inception Score, KID and precision/recall with torch-fidelity.

Features: torch-fidelity's ``inception-v3-compat`` (the TF 2015-12-05 Inception, resized to 299x299 with
its TF1-exact bilinear interpolation), ``2048`` pool features and ``logits_unbiased`` (pool features
times the fc weights without the bias, as the original IS code and ADM's evaluator compute them).
The metrics are torch-fidelity's functions on those features:

* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits, *in sample order* (as ADM
  splits 50,000 samples into 10 x 5,000; torch-fidelity's own default shuffles first);
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  ``(x.y / d + 1)^3`` over 100 random subsets of min(1000, N) samples (rng seed 2020);
* precision/recall (Kynkaenniemi et al. 2019) with k = 3 nearest neighbours on the *Inception* pool
  features (ADM's choice; torch-fidelity defaults to VGG16 features).

    bash scripts/eval.sh inception runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .sources import cached_reference, feature_pass, image_source, resolve_device, torch_hub_weights_error

WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
METRICS = ("is", "kid", "pr")


def load_extractor(device: torch.device) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 giving ("2048", "logits_unbiased"); one clear error without its weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], verbose=False)
    except Exception as err:  # URLError etc.: the weights are not here
        raise torch_hub_weights_error("torch-fidelity's Inception weights", WEIGHTS, URL_INCEPTION_V3, err) from err
    return model.to(device)


def fidelity_extractor(model: Callable) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """uint8 NCHW -> {"pool", "logits"} from a torch-fidelity style extractor (returns a tuple in that order)."""

    def extract(x: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = model(x)
        return {"pool": pool, "logits": logits}

    return extract


def inception_score(logits: np.ndarray, splits: int = 10) -> dict:
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = min(splits, len(logits))
    out = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    return {"is": out["inception_score_mean"], "is_std": out["inception_score_std"], "is_splits": splits}


def kid(features: np.ndarray, reference: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> dict:
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features), len(reference))
    out = kid_features_to_metric(torch.from_numpy(features), torch.from_numpy(reference), kid_subsets=subsets,
                                 kid_subset_size=size, rng_seed=seed, verbose=False)
    return {"kid": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"],
            "kid_subsets": subsets, "kid_subset_size": size}


def precision_recall(features: np.ndarray, reference: np.ndarray, k: int = 3) -> dict:
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(torch.from_numpy(features).float(), torch.from_numpy(reference).float(),
                                 prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"]), "pr_k": k}


def compute_inception_metrics(run: str | Path, reference: str | Path | None, metrics=METRICS, batch_size: int = 50,
                              device: str = "auto", model: Callable | None = None,
                              feature_id: str | None = None) -> dict[str, dict]:
    """``{metric: result}`` for ``metrics`` (any of "is", "kid", "pr") of the images of ``run``.

    KID and precision/recall need ``reference`` images (an ``.npz`` arr_0 or a folder; their features are
    cached beside it); IS does not. ``model`` replaces torch-fidelity's network (uint8 NCHW -> (pool, logits)).
    """
    import torch_fidelity

    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"--metrics {list(metrics)} is invalid: choose from {list(METRICS)}")
    paired = [m for m in metrics if m in ("kid", "pr")]
    if paired and reference is None:
        raise ValueError(f"{'/'.join(paired)} compare with real images: pass --ref <.npz of images or a folder>")
    dev = resolve_device(device)
    source = image_source(run)
    ref_source = image_source(reference) if paired else None  # checked before the network loads
    if model is None:
        model = load_extractor(dev)
        feature_id = f"torch-fidelity-{torch_fidelity.__version__}-inception-v3-compat"
        network = (f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat ({WEIGHTS}): 2048-d pool "
                   f"features and unbiased logits, TF1-exact bilinear resize to 299x299")
    elif not feature_id:
        raise ValueError("a custom feature model needs a feature_id (it names the reference feature cache)")
    else:
        network = feature_id
    extract = fidelity_extractor(model)
    feats = feature_pass(source, extract, batch_size, dev, f"Inception {source.path.name}")
    common = {"num_items": int(len(feats["pool"])), "source": source.description, "feature_extractor": network}
    results = {}
    if "is" in metrics:
        results["is"] = {**inception_score(feats["logits"]), **common,
                         "definition": "IS = exp(E_x KL(p(y|x) || p(y))), softmax of unbiased logits, splits in "
                                       "sample order (torch-fidelity isc_features_to_metric, shuffle=False)"}
    if paired:
        def compute():
            return {"pool": feature_pass(ref_source, extract, batch_size, dev, f"reference {ref_source.path.name}")[
                "pool"].astype(np.float32)}

        ref, cache = cached_reference(ref_source, f"pool-{feature_id}", compute)
        ref_info = {"reference": str(Path(reference).expanduser()), "reference_num_items": int(len(ref["pool"])),
                    "reference_cache": str(cache)}
        pool = feats["pool"].astype(np.float32)
        if "kid" in metrics:
            results["kid"] = {**kid(pool.astype(np.float64), ref["pool"].astype(np.float64)), **common, **ref_info,
                              "definition": "KID = unbiased MMD^2, kernel (x.y/d + 1)^3, mean over subsets "
                                            "(torch-fidelity kid_features_to_metric)"}
        if "pr" in metrics:
            results["pr"] = {**precision_recall(pool, ref["pool"]), **common, **ref_info,
                             "definition": "precision/recall of k-NN manifolds (Kynkaanniemi et al. 2019) on "
                                           "Inception pool features (torch-fidelity prc_features_to_metric)"}
    return results
