"""VBench (0.1.5) dimensions of a folder of mp4 files, run inside ``.venv-vbench``.

Request: ``{"protocol": 1, "videos": [{"prompt", "index", "file"}], "dimensions": [...], "work_dir": DIR,
"full_info": null | PATH, "device": "auto", "cache_dir": null | DIR}``. Result: ``{"dimensions": {dim:
{"score", "num_videos"}}, "errors": {dim: "one line"}, "package_version"}``.

VBench's standard mode looks videos up as ``{prompt}-{index}{suffix}`` in one folder, taking the suffix
from the *first* file it lists, so the run folder itself (metrics.json, config.yaml) cannot be given to
it: the runner links the videos into ``work_dir/videos`` under exactly those names. Each dimension is
evaluated on its own (``local=True``: every model is read from ``VBENCH_CACHE_DIR``), so one dimension
whose model is missing does not lose the others. Missing weights are listed before anything runs.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _protocol import RunnerError, import_or_fail, main, resolve_device  # noqa: E402

DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
              "dynamic_degree", "aesthetic_quality", "imaging_quality", "object_class", "multiple_objects",
              "human_action", "color", "spatial_relationship", "scene", "appearance_style", "temporal_style",
              "overall_consistency")
_CLIP_B32 = ("clip_model/ViT-B-32.pt", "https://openaipublic.azureedge.net/clip/models/"
             "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
_CLIP_L14 = ("clip_model/ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
             "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")
_GRIT = ("grit_model/grit_b_densecap_objectdet.pth",
         "https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth")
_VICLIP = ("ViCLIP/ViClip-InternVid-10M-FLT.pth",
           "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/ViClip-InternVid-10M-FLT.pth")
# What vbench 0.1.5's init_submodules(local=True) reads from VBENCH_CACHE_DIR, per dimension (its URLs).
WEIGHTS = {
    "subject_consistency": [
        ("dino_model/facebookresearch_dino_main/hubconf.py", "git clone https://github.com/facebookresearch/dino "
                                                              "dino_model/facebookresearch_dino_main"),
        ("dino_model/dino_vitbase16_pretrain.pth",
         "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")],
    "background_consistency": [_CLIP_B32],
    "temporal_flickering": [],
    "motion_smoothness": [("amt_model/amt-s.pth", "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth")],
    "dynamic_degree": [("raft_model/models/raft-things.pth",
                        "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip (unzip into raft_model/)")],
    "aesthetic_quality": [_CLIP_L14, ("aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
                                      "https://github.com/LAION-AI/aesthetic-predictor/blob/main/"
                                      "sa_0_4_vit_l_14_linear.pth?raw=true")],
    "imaging_quality": [("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth", "https://github.com/chaofengc/IQA-PyTorch/"
                                                                     "releases/download/v0.1-weights/"
                                                                     "musiq_spaq_ckpt-358bb6af.pth")],
    "object_class": [_GRIT], "multiple_objects": [_GRIT], "color": [_GRIT], "spatial_relationship": [_GRIT],
    "human_action": [("umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
                      "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main/"
                      "l16_ptk710_ftk710_ftk400_f16_res224.pth")],
    "scene": [("caption_model/tag2text_swin_14m.pth",
               "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth")],
    "appearance_style": [_CLIP_B32],
    "temporal_style": [_VICLIP], "overall_consistency": [_VICLIP],
}
NEEDS_DETECTRON2 = {"object_class", "multiple_objects", "color", "spatial_relationship"}


def cache_dir(request: dict) -> str:
    return request.get("cache_dir") or os.environ.get("VBENCH_CACHE_DIR") or os.path.expanduser("~/.cache/vbench")


def check() -> dict:
    import_or_fail("vbench", "vbench", "vbench")
    from importlib.metadata import version

    return {"package": "vbench", "package_version": version("vbench")}


def missing_weights(dimensions: list[str], root: str) -> dict[str, list[str]]:
    """``{dimension: ["PATH (from URL)", ...]}`` for every file a dimension needs that is not in ``root``."""
    out = {}
    for dim in dimensions:
        lacking = [f"{os.path.join(root, rel)} (from {url})" for rel, url in WEIGHTS[dim]
                   if not os.path.exists(os.path.join(root, rel))]
        if lacking:
            out[dim] = lacking
    return out


def link_videos(videos: list[dict], folder: str) -> int:
    """Link every video into ``folder`` as ``{prompt}-{index}.mp4`` (VBench's lookup name)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    for video in videos:
        suffix = os.path.splitext(video["file"])[1] or ".mp4"
        os.symlink(os.path.abspath(video["file"]), os.path.join(folder, f"{video['prompt']}-{video['index']}{suffix}"))
    return len(videos)


def run(request: dict) -> dict:
    root = cache_dir(request)
    os.environ["VBENCH_CACHE_DIR"] = root  # vbench.utils reads it at import time
    info = check()
    dims = list(request.get("dimensions") or DIMENSIONS)
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise RunnerError(f"unknown VBench dimension(s) {unknown}; choose from {list(DIMENSIONS)}", "bad_request")
    videos = request.get("videos") or []
    absent = [v["file"] for v in videos if not os.path.isfile(v["file"])]
    if not videos or absent:
        raise RunnerError(f"no videos to evaluate ({len(absent)} missing, e.g. {absent[:1]})", "bad_request")
    lacking = missing_weights(dims, root)
    if NEEDS_DETECTRON2 & set(dims):
        try:
            import detectron2  # noqa: F401
        except ImportError:
            for dim in sorted(NEEDS_DETECTRON2 & set(dims)):
                lacking.setdefault(dim, []).append("the detectron2 package (pip install --no-build-isolation "
                                                   "'git+https://github.com/facebookresearch/detectron2.git')")
    if lacking:
        files = sorted({f for fs in lacking.values() for f in fs})
        raise RunnerError(f"VBench models missing for {sorted(lacking)} in VBENCH_CACHE_DIR={root}: "
                          f"{'; '.join(files)}. Run once where there is network (VBench fetches them there), or "
                          f"place the files by hand, then pass --cache-dir DIR or set VBENCH_CACHE_DIR",
                          "weights_missing")

    from vbench import VBench

    device = resolve_device(request.get("device", "auto"))
    work = os.path.abspath(request["work_dir"])
    linked = link_videos(videos, os.path.join(work, "videos"))
    full_info = request.get("full_info") or os.path.join(os.path.dirname(sys.modules["vbench"].__file__),
                                                          "VBench_full_info.json")
    bench = VBench(device, full_info, os.path.join(work, "results"))
    scores, errors = {}, {}
    for dim in dims:
        name = f"run-{dim}"
        try:
            bench.evaluate(videos_path=os.path.join(work, "videos"), name=name, dimension_list=[dim], local=True,
                           read_frame=False, mode="vbench_standard")
            with open(os.path.join(work, "results", f"{name}_eval_results.json")) as handle:
                score, per_video = json.load(handle)[dim]
            scores[dim] = {"score": float(score), "num_videos": len(per_video) if isinstance(per_video, list)
                           else None}
        except Exception as err:  # noqa: BLE001 - one dimension's failure is reported, the others go on
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            errors[dim] = f"{type(err).__name__}: {first[:300]}"
    return {**info, "dimensions": scores, "errors": errors, "videos_linked": linked, "full_info": full_info,
            "device": device, "cache_dir": root}


if __name__ == "__main__":
    sys.exit(main(run, check))
