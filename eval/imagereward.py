"""ImageReward-v1.0 (Xu et al. 2023) of a FLUX run's images with their prompts, through ``.venv-imagereward``.

The image-reward package pins timm 0.6.13 and transformers 4.x, so it runs in its own environment
(``bash scripts/setup_eval_envs.sh imagereward``); this module sends it the images and prompts of a run
folder and gets one score per image back (``runners/run_imagereward.py``). The run's value is the mean.

    bash scripts/eval.sh imagereward runs/flux/<run> [--model-dir DIR] [--prompts drawbench.txt]
"""

from __future__ import annotations

import numpy as np

from .external import call_runner
from .rundir import RunFolder

DEFINITION = ("ImageReward-v1.0 (image-reward package): BLIP ViT-L image features crossed with the prompt (35 "
              "tokens), MLP head, standardised with the package's mean/std; mean over images")


def compute_imagereward(run: RunFolder, model_dir: str | None = None, device: str = "auto", python: str | None = None,
                        env: dict | None = None) -> dict:
    missing = [i.key for i in run.items if i.prompt is None]
    if missing:
        raise ValueError(f"{run.path}: items {missing[:3]} have no prompt in metrics.json; ImageReward scores an "
                         f"image against its prompt (pass a run folder written by scripts/sample_flux.sh)")
    request = {"items": [{"key": i.key, "prompt": i.prompt, "file": str(i.path.resolve())} for i in run.items],
               "model": "ImageReward-v1.0", "model_dir": model_dir, "device": device}
    result = call_runner("imagereward", request, python=python, env=env)
    scores = result["scores"]
    absent = [i.key for i in run.items if i.key not in scores]
    if absent:
        raise ValueError(f"the ImageReward runner returned no score for items {absent[:3]}")
    values = np.array([scores[i.key] for i in run.items], dtype=np.float64)
    return {"imagereward": float(values.mean()), "imagereward_std": float(values.std()), "num_items": len(values),
            "model": "ImageReward-v1.0", "package": f"image-reward {result.get('package_version')}",
            "weights": result.get("weights"), "definition": DEFINITION,
            "per_item": {i.key: float(scores[i.key]) for i in run.items}}
