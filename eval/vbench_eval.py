"""VBench on a HunyuanVideo run: the 16 dimensions through ``.venv-vbench`` and the total score as VBench
defines it (its repository's ``scripts/constant.py`` and ``scripts/cal_final_score.py``):

* each dimension ``d`` is min-max normalised, ``n_d = (s_d - Min_d) / (Max_d - Min_d)``, with VBench's
  constants below, and weighted (``w = 0.5`` for dynamic degree, 1 otherwise);
* Quality = sum of ``w_d n_d`` over the 7 quality dimensions / sum of their weights (6.5);
  Semantic = the same over the 9 semantic dimensions (9);
* Total = (4 Quality + 1 Semantic) / 5.

    bash scripts/eval.sh prompts vbench -o vbench_prompts.txt       # VBench's prompts, one per line
    bash scripts/sample_hunyuan_video.sh prompt_file=vbench_prompts.txt     # 5 videos each, seeds 42..46
    bash scripts/eval.sh vbench runs/hunyuan_video/<run>
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

from taylorseer.harness.runs import write_text

from .external import REPO, call_runner
from .rundir import RunFolder

# VBench's scripts/constant.py (github.com/Vchitect/VBench), by dimension key.
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in NORMALIZE}
QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0
DIMENSIONS = QUALITY + SEMANTIC
VIDEOS_PER_PROMPT = 5
DEFINITION = ("VBench 0.1.5 dimensions (standard mode, 5 videos per prompt); total = (4 Quality + 1 Semantic)/5 "
              "of min-max normalised dimensions, dynamic degree weighted 0.5 (VBench scripts/constant.py)")


def total_score(scores: dict[str, float]) -> dict:
    """Quality, semantic and total score (fractions, as VBench prints them) from the 16 raw dimension scores."""
    missing = [d for d in DIMENSIONS if d not in scores]
    if missing:
        raise ValueError(f"the VBench total needs all 16 dimensions; missing {missing}")
    weighted = {d: (scores[d] - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) * DIM_WEIGHT[d]
                for d in DIMENSIONS}
    quality = sum(weighted[d] for d in QUALITY) / sum(DIM_WEIGHT[d] for d in QUALITY)
    semantic = sum(weighted[d] for d in SEMANTIC) / sum(DIM_WEIGHT[d] for d in SEMANTIC)
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"total_score": total, "quality_score": quality, "semantic_score": semantic,
            "normalized_weighted": weighted}


def find_full_info(path: str | None = None) -> Path:
    """``VBench_full_info.json``: ``path``, else the one in ``.venv-vbench``'s vbench package."""
    if path:
        found = Path(path).expanduser()
        if not found.is_file():
            raise FileNotFoundError(f"--full-info {found} does not exist")
        return found
    root = Path(os.environ.get("EVAL_ENV_ROOT", REPO))
    pattern = str(root / ".venv-vbench" / "lib" / "python*" / "site-packages" / "vbench" / "VBench_full_info.json")
    hits = sorted(glob.glob(pattern))
    if not hits:
        raise FileNotFoundError(
            "VBench's prompt list VBench_full_info.json ships in the vbench wheel: build the environment with "
            "`bash scripts/setup_eval_envs.sh vbench`, or `pip download vbench==0.1.5 --no-deps`, unzip the wheel "
            "and pass --full-info <unzipped>/vbench/VBench_full_info.json")
    return Path(hits[-1])


def vbench_prompts(full_info: Path) -> list[str]:
    """VBench's prompts in file order, each once (the list holds 946 entries, 944 distinct prompts)."""
    entries = json.loads(Path(full_info).read_text())
    return list(dict.fromkeys(entry["prompt_en"] for entry in entries))


def write_prompt_file(out: str | Path, full_info: str | None = None) -> dict:
    info = find_full_info(full_info)
    prompts = vbench_prompts(info)
    if any("\n" in p for p in prompts):
        raise ValueError(f"{info} holds a prompt with a line break; it cannot go into a one-per-line prompt file")
    write_text(out, "".join(p + "\n" for p in prompts))
    return {"prompts": len(prompts), "source": str(info), "out": str(out)}


def expected_videos(full_info: Path, dimension: str) -> int:
    """How many videos VBench's standard mode looks for in ``dimension``: 5 per prompt of that dimension."""
    entries = json.loads(Path(full_info).read_text())
    return VIDEOS_PER_PROMPT * sum(dimension in entry["dimension"] for entry in entries)


def compute_vbench(run: RunFolder, dimensions: list[str] | None = None, device: str = "auto",
                   cache_dir: str | None = None, python: str | None = None, full_info: str | None = None,
                   env: dict | None = None) -> dict:
    dims = list(dimensions or DIMENSIONS)
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; choose from {list(DIMENSIONS)}")
    bad = [i.key for i in run.items if i.prompt is None or i.index is None]
    if bad:
        raise ValueError(f"{run.path}: items {bad[:3]} have no prompt/index in metrics.json; VBench looks videos up "
                         f"by prompt and index (pass a run folder written by scripts/sample_hunyuan_video.sh)")
    with tempfile.TemporaryDirectory(prefix="taylorseer-vbench-") as work:
        request = {"videos": [{"prompt": i.prompt, "index": i.index, "file": str(i.path.resolve())}
                              for i in run.items],
                   "dimensions": dims, "work_dir": work, "device": device, "cache_dir": cache_dir,
                   "full_info": str(Path(full_info).expanduser().resolve()) if full_info else None}
        result = call_runner("vbench", request, python=python, env=env)
    scores = {d: v["score"] for d, v in result["dimensions"].items()}
    out = {"dimensions": scores, "num_videos": {d: v.get("num_videos") for d, v in result["dimensions"].items()},
           "errors": result.get("errors", {}), "num_items": len(run.items), "package": f"vbench "
           f"{result.get('package_version')}", "full_info": result.get("full_info"), "definition": DEFINITION}
    info = Path(result["full_info"]) if result.get("full_info") and Path(result["full_info"]).is_file() else None
    if info is not None:
        out["expected_videos"] = {d: expected_videos(info, d) for d in dims}
    if all(d in scores for d in DIMENSIONS):
        out.update(total_score(scores))
    else:
        out["total_score"] = None
        out["total_missing"] = [d for d in DIMENSIONS if d not in scores]
    return out
