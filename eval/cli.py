"""One command for every metric over finished run folders: ``bash scripts/eval.sh <metric> RUN [RUN ...]``.

    bash scripts/eval.sh fid runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz
    bash scripts/eval.sh inception runs/dit_fid/<run> --ref VIRTUAL_imagenet256_labeled.npz   # IS, KID, P/R
    bash scripts/eval.sh clip runs/flux/<run> [--prompts drawbench.txt]
    bash scripts/eval.sh imagereward runs/flux/<run> [--model-dir DIR]           # in .venv-imagereward
    bash scripts/eval.sh fidelity runs/flux/<cached> --reference runs/flux/<uncached>   # PSNR, SSIM, LPIPS
    bash scripts/eval.sh vbench runs/hunyuan_video/<run> [--dimensions ...]      # in .venv-vbench
    bash scripts/eval.sh digits runs/dit_fid/<digits run> --reference runs/dit_fid/<uncached digits run>
    bash scripts/eval.sh prompts drawbench --source drawbench.parquet -o drawbench.txt
    bash scripts/eval.sh prompts vbench -o vbench_prompts.txt

Each result is printed as a small table and stored in the run folder's ``metrics.json["eval"][<name>]``
(with ``num_items``, the metric's definition, model and version, and the reference for paired metrics);
rerunning a metric replaces its entry. ``--tag T`` stores it as ``<name>@T`` instead, e.g. FID against
two references. Bad input fails with one line before any model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

from taylorseer.harness.runs import clear_errors, record_eval

from .external import RunnerFailed
from .report import markdown_table
from .rundir import check_reference, completeness, open_run
from .sources import resolve_device

TAG = "eval"


def _common(parser: argparse.ArgumentParser, media: bool = True) -> None:
    parser.add_argument("runs", nargs="+", help="run folders (or image folders / .npz files for fid, inception)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--tag", help="store the result as <metric>@TAG (keeps results against other references)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--partial", action="store_true",
                        help="compute on an incomplete run folder too; the result is stored marked partial")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bash scripts/eval.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="metric", required=True, metavar="METRIC")

    p = sub.add_parser("fid", help="FID (pytorch-fid Inception pool3) against a reference .npz / folder")
    _common(p)
    p.add_argument("--ref", required=True, help=".npz with arr_0 images or mu/sigma statistics, or an image folder")
    p.add_argument("--ref-use", choices=("images", "statistics"), default="images",
                   help="images: statistics of the reference's images (cached beside it, default); statistics: "
                        "the mu/sigma stored in the .npz (ADM's reference batches carry TF statistics)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--dims", type=int, default=2048, choices=(64, 192, 768, 2048))

    p = sub.add_parser("inception", help="Inception Score, KID, precision/recall (torch-fidelity)")
    _common(p)
    p.add_argument("--ref", help="reference images (.npz arr_0 or folder), needed for kid and pr")
    p.add_argument("--metrics", nargs="+", choices=("is", "kid", "pr"),
                   help="default: is, and kid pr when --ref is given")
    p.add_argument("--batch-size", type=int, default=50)

    p = sub.add_parser("clip", help="CLIP score of each image with its prompt")
    _common(p)
    p.add_argument("--clip-model", help="hub id or local folder (default: laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompts", help="the benchmark's prompt file (e.g. drawbench.txt): record how much is covered")

    p = sub.add_parser("imagereward", help="ImageReward-v1.0 (runs in .venv-imagereward)")
    _common(p)
    p.add_argument("--model-dir", help="folder with ImageReward.pt and med_config.json (default: download)")
    p.add_argument("--python", help="python of an environment with image-reward (default: .venv-imagereward)")
    p.add_argument("--prompts", help="the benchmark's prompt file (e.g. drawbench.txt): record how much is covered")

    p = sub.add_parser("fidelity", help="PSNR, SSIM, LPIPS against the uncached outputs of the same seeds")
    _common(p)
    p.add_argument("--reference", help="run folder of the uncached outputs (default: <run>/uncached)")
    p.add_argument("--lpips", default="alex", choices=("alex", "vgg", "none"), help="LPIPS backbone, or none")

    p = sub.add_parser("digits", help="the bundled digits model: accuracy, digits FID, fidelity to the uncached run")
    _common(p)
    p.add_argument("--reference", help="run folder of the uncached samples of the same seeds (adds PSNR and FID "
                                       "against them)")

    p = sub.add_parser("vbench", help="VBench's 16 dimensions and total score (runs in .venv-vbench)")
    _common(p)
    p.add_argument("--dimensions", nargs="+", help="a subset of the 16 dimensions (default: all)")
    p.add_argument("--cache-dir", help="VBench's model folder (default: $VBENCH_CACHE_DIR or ~/.cache/vbench)")
    p.add_argument("--python", help="python of an environment with vbench (default: .venv-vbench)")
    p.add_argument("--full-info", help="VBench_full_info.json (default: the one in the vbench package)")
    p.add_argument("--merge", action="store_true",
                   help="keep dimensions of an earlier vbench result on the same videos that this run does not redo")

    p = sub.add_parser("prompts", help="write a benchmark's prompt file (one prompt per line)")
    p.add_argument("benchmark", choices=("drawbench", "vbench"))
    p.add_argument("-o", "--out", required=True, help="the prompt file to write")
    p.add_argument("--source", help="drawbench: the downloaded .parquet/.csv/.jsonl/.txt")
    p.add_argument("--full-info", help="vbench: VBench_full_info.json (default: the one in .venv-vbench)")
    p.add_argument("--allow-other-size", action="store_true", help="drawbench: accept a list of other than 200")
    return parser


def _validate(args: argparse.Namespace) -> None:
    """Everything checkable before a model loads: the folders exist and hold what the metric reads."""
    if args.metric == "prompts":
        if args.benchmark == "drawbench" and not args.source:
            raise ValueError("prompts drawbench needs --source <downloaded DrawBench .parquet/.csv> (see README)")
        return
    for key in ("batch_size",):
        if getattr(args, key, 1) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: expected >= 1")
    try:
        resolve_device(args.device)
    except ValueError as err:
        raise ValueError(f"--device {args.device}: {err}") from None
    for run in args.runs:  # an incomplete run is refused (or, with --partial, marked) before anything loads
        completeness(run, args.partial)
    for reference in (getattr(args, "reference", None), getattr(args, "ref", None)):
        if reference:
            completeness(reference, args.partial, what="the reference")
            for run in (args.runs if getattr(args, "reference", None) == reference else ()):
                check_reference(run, reference)
    if args.metric in ("clip", "imagereward", "fidelity", "digits"):
        for run in args.runs:
            open_run(run, "any" if args.metric == "fidelity" else "image")
    elif args.metric == "vbench":
        for run in args.runs:
            open_run(run, "video")


def _record(run_path: str, name: str, result: dict, tag: str | None) -> str:
    key = f"{name}@{tag}" if tag else name
    result = {**result, "computed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record_eval(run_path, key, result)
    return key


def _coverage(run, prompt_file: str | None) -> dict:
    if not prompt_file:
        return {}
    from .prompts import prompt_coverage

    return {"coverage": prompt_coverage([i.prompt for i in run.items], prompt_file)}


def run_metric(args: argparse.Namespace) -> list[dict]:
    """Compute the metric for every run folder, record it, and return one table row per (run, entry)."""
    rows = []
    for path in args.runs:
        entries: dict[str, dict] = {}
        if args.metric == "fid":
            from .fid import compute_fid

            entries["fid"] = compute_fid(path, args.ref, args.batch_size, args.device, args.dims, args.ref_use)
        elif args.metric == "inception":
            from .inception_metrics import compute_inception_metrics

            metrics = args.metrics or (["is", "kid", "pr"] if args.ref else ["is"])
            entries.update(compute_inception_metrics(path, args.ref, metrics, args.batch_size, args.device))
        elif args.metric == "clip":
            from .clip_score import DEFAULT_MODEL, compute_clip_score

            run = open_run(path, "image")
            entries["clip_score"] = {**compute_clip_score(run, args.clip_model or DEFAULT_MODEL, args.batch_size,
                                                          args.device), **_coverage(run, args.prompts)}
        elif args.metric == "imagereward":
            from .imagereward import compute_imagereward

            run = open_run(path, "image")
            entries["imagereward"] = {**compute_imagereward(run, args.model_dir, args.device, args.python),
                                      **_coverage(run, args.prompts)}
        elif args.metric == "fidelity":
            from .paired import compute_paired

            run = open_run(path, "any")
            entries["fidelity"] = compute_paired(run, args.reference, None if args.lpips == "none" else args.lpips,
                                                 args.device)
        elif args.metric == "vbench":
            entries["vbench"] = _vbench(path, args)
        elif args.metric == "digits":
            from .digits_metrics import compute_digits

            entries["digits"] = compute_digits(open_run(path, "image"), args.reference)
        marks = completeness(path, args.partial)
        for name, result in entries.items():
            result = {**result, **marks}
            key = _record(path, name, result, args.tag)
            rows.append({"run": str(path), "entry": key, **{k: v for k, v in result.items()
                                                             if isinstance(v, (int, float)) and k != "num_items"},
                         "num_items": result["num_items"]})
    return rows


def _vbench(path: str, args: argparse.Namespace) -> dict:
    from taylorseer.harness.runs import read_json

    from .vbench_eval import DIMENSIONS, compute_vbench, total_score

    run = open_run(path, "video")
    result = compute_vbench(run, args.dimensions, args.device, args.cache_dir, args.python, args.full_info)
    if args.merge:
        key = f"vbench@{args.tag}" if args.tag else "vbench"
        old = ((read_json(run.path / "metrics.json") or {}).get("eval") or {}).get(key) or {}
        if old.get("num_items") == result["num_items"]:
            kept = {d: s for d, s in old.get("dimensions", {}).items() if d not in result["dimensions"]}
            result["dimensions"] = {**kept, **result["dimensions"]}
            result["num_videos"] = {**{d: old.get("num_videos", {}).get(d) for d in kept}, **result["num_videos"]}
            result["merged_from_earlier"] = sorted(kept)
            if all(d in result["dimensions"] for d in DIMENSIONS):
                result.pop("total_missing", None)
                result.update(total_score(result["dimensions"]))
    return result


def print_rows(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    columns = ["run", "entry", "num_items"] + [c for c in dict.fromkeys(k for r in rows for k in r)
                                               if c not in ("run", "entry", "num_items")]
    print(markdown_table(rows, columns, digits=4), end="")


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    _validate(args)
    if args.metric == "prompts":
        if args.benchmark == "drawbench":
            from .prompts import write_drawbench

            info = write_drawbench(args.source, args.out, args.allow_other_size)
        else:
            from .vbench_eval import write_prompt_file

            info = write_prompt_file(args.out, args.full_info)
        print(f"[{TAG}] wrote {info['prompts']} prompts to {info['out']} (from {info['source']})")
        return [info]
    rows = run_metric(args)
    print_rows(rows, args.json)
    return rows


@clear_errors(TAG, also=(RunnerFailed,))
def cli() -> None:
    main()


if __name__ == "__main__":
    sys.exit(cli())
