"""ImageReward-v1.0 scores of image files, run inside ``.venv-imagereward`` (image-reward 1.5).

Request: ``{"protocol": 1, "items": [{"key", "prompt", "file"}], "model": "ImageReward-v1.0",
"model_dir": null | DIR, "device": "auto"}``. Result: ``{"scores": {key: float}, "package_version",
"model", "weights"}``. A score is ``ImageReward.score(prompt, file)``: BLIP ViT-L image features crossed
with the prompt (35 BLIP tokens), an MLP head, standardised by the package's mean 0.1672 and std 1.0333.

Weights: ``ImageReward.pt`` and ``med_config.json`` of the hub repo ``THUDM/ImageReward`` (in
``model_dir`` or ``~/.cache/ImageReward``), and the ``bert-base-uncased`` tokenizer from the Hugging Face
cache (``HF_HOME``). When any of them cannot be had, the result is one error naming them.
"""

from __future__ import annotations

import os
import pickle
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import RunnerError, import_or_fail, main, resolve_device  # noqa: E402

HUB_REPO = "THUDM/ImageReward"
FILES = ("ImageReward.pt", "med_config.json")


def check() -> dict:
    reward = import_or_fail("ImageReward", "image-reward", "imagereward")
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("image-reward")
    except PackageNotFoundError:
        package_version = getattr(reward, "__version__", "unknown")
    return {"package": "image-reward", "package_version": package_version}


def weights_help(folder: str, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return (f"ImageReward-v1.0 weights could not be loaded ({type(err).__name__}: {first[:300]}). It needs "
            f"{' and '.join(FILES)} of the hub repo {HUB_REPO} (looked in {folder}) and the bert-base-uncased "
            f"tokenizer (Hugging Face cache {hf_home}). Offline: on a machine with network run "
            f"`huggingface-cli download {HUB_REPO} {' '.join(FILES)} --local-dir DIR` and "
            f"`huggingface-cli download bert-base-uncased`, copy DIR and the HF cache here, then pass "
            f"--model-dir DIR and set HF_HOME (and HF_HUB_OFFLINE=1)")


def load_model(reward, request: dict, device: str):
    folder = request.get("model_dir") or os.path.expanduser("~/.cache/ImageReward")
    name = request.get("model", "ImageReward-v1.0")
    try:
        if request.get("model_dir"):
            missing = [f for f in FILES if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise FileNotFoundError(f"missing {', '.join(missing)} in {folder}")
            model = reward.load(os.path.join(folder, FILES[0]), device=device, download_root=folder,
                                med_config=os.path.join(folder, FILES[1]))
        else:
            model = reward.load(name, device=device, download_root=folder)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # hub and requests errors (OSError/ValueError subclasses), a truncated or foreign checkpoint
        # (RuntimeError, EOFError, UnpicklingError): the weights are not there. Anything else is a bug.
        raise RunnerError(weights_help(folder, err), "weights_missing") from err
    return model, folder


def run(request: dict) -> dict:
    info = check()
    reward = import_or_fail("ImageReward", "image-reward", "imagereward")
    import torch

    items = request.get("items") or []
    if not items:
        raise RunnerError("the request holds no items to score", "bad_request")
    missing = [it["file"] for it in items if not os.path.isfile(it["file"])]
    if missing:
        raise RunnerError(f"{len(missing)} image file(s) are missing, e.g. {missing[0]}", "bad_request")
    device = resolve_device(request.get("device", "auto"))
    model, folder = load_model(reward, request, device)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with image-reward's dependencies; never fail on a progress bar
        def tqdm(iterable, **_):
            return iterable
    scores = {}
    with torch.no_grad():
        for item in tqdm(items, desc="ImageReward", unit="img", file=sys.stderr):
            scores[item["key"]] = float(model.score(item["prompt"], item["file"]))
    return {**info, "scores": scores, "model": request.get("model", "ImageReward-v1.0"), "weights": folder,
            "device": device}


if __name__ == "__main__":
    sys.exit(main(run, check))
