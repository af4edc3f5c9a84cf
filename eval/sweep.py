"""Reproduce a paper table with one command: sample every point of its sweep, run its metrics, build the table.

    bash scripts/sweep.sh digits                               # the bundled digits model, CPU, minutes
    bash scripts/sweep.sh dit_fid50k hydra/launcher=slurm hydra.launcher.partition=gpu
    bash scripts/sweep.sh flux_drawbench --stage table         # rebuild the table from the run folders

An experiment (``configs/experiment/<name>.yaml``) names the sampling app, the settings every run shares
(``common``: Hydra overrides, the deltas from the app's own config), and ``blocks``: each block is one
Hydra multirun of the app (the product of its sweep overrides, e.g. ``cache.interval=3,4,5``), so the
grid and the baselines (no cache, FORA, fewer steps, diffusers' hook) are separate blocks of explicit
points and no point is sampled twice. Stages:

1. **sample**: every block is launched as ``python -m <app> --multirun ...`` with the launcher given on
   the command line (Hydra's basic launcher by default; ``hydra/launcher=slurm`` submits a Slurm array).
   A point whose run folder is complete returns at once without loading weights, and a killed sweep
   resumes where it stopped: the apps resume their run folders. A failed job does not stop the others.
2. **metrics**: every metric of the experiment on every run folder (``bash scripts/eval.sh`` in-process),
   with ``{reference}`` replaced by the reference block's run folder; results go into each folder's
   ``metrics.json["eval"]``. A metric already there for the same number of outputs is not recomputed.
3. **table**: one row per point, failed and incomplete points marked, as markdown, CSV and a plot
   (:mod:`taylorseer_eval.aggregate`).

Everything lands in ``${out_root}`` (default ``runs/tables/<experiment>``): the run folders, the Hydra
multirun logs (``multirun/<block>/``) and ``table.md``, ``table.csv``, ``table.png``, ``sweep.json``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from taylorseer.harness import runs
from taylorseer.harness.slurm_launcher import FAILURE_RECORD, SweepFailures

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiment"
TAG = "sweep"
STAGES = ("sample", "metrics", "table")


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its block and the Hydra overrides that make it (common ones included)."""

    block: str
    overrides: tuple[str, ...]


@dataclass
class Experiment:
    name: str
    app: str  # module of a Hydra sampling app, e.g. taylorseer_dit.sample_ddp
    common: list[str]
    blocks: dict[str, list[str]]
    reference: str | None = None  # the block whose (single) run paired metrics compare with
    metrics: list[list[str]] = field(default_factory=list)  # eval.sh argument lists, {reference} filled in
    table: dict = field(default_factory=dict)
    description: str = ""


def load_experiment(name: str) -> Experiment:
    path = Path(name) if name.endswith(".yaml") else EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))
        raise ValueError(f"no experiment {name!r} ({path} does not exist); experiments: {known}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    allowed = {"app", "common", "blocks", "reference", "metrics", "table", "description"}
    unknown = sorted(set(spec) - allowed)
    if unknown or "app" not in spec or "blocks" not in spec:
        raise ValueError(f"{path}: unknown keys {unknown} or missing app/blocks; an experiment has {sorted(allowed)}")
    exp = Experiment(name=path.stem, app=spec["app"], common=[str(o) for o in spec.get("common") or []],
                     blocks={k: [str(o) for o in v] for k, v in spec["blocks"].items()},
                     reference=spec.get("reference"), metrics=[[str(a) for a in m] for m in spec.get("metrics") or []],
                     table=spec.get("table") or {}, description=spec.get("description", ""))
    if exp.reference is not None and exp.reference not in exp.blocks:
        raise ValueError(f"{path}: reference {exp.reference!r} is not one of the blocks {sorted(exp.blocks)}")
    return exp


def expand(block_overrides: list[str]) -> list[list[str]]:
    """The points of one block: the product of its sweeps, parsed by Hydra's own override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(block_overrides)
    choices = []
    for override in parsed:
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def points(exp: Experiment, extra: list[str]) -> list[Point]:
    return [Point(block, tuple(exp.common + combo + extra))
            for block, sweep in exp.blocks.items() for combo in expand(sweep)]


def app_module(exp: Experiment):
    try:
        module = importlib.import_module(exp.app)
    except ImportError as err:
        raise ValueError(f"experiment {exp.name}: app {exp.app!r} cannot be imported ({err})") from err
    if not hasattr(module, "run_dir") or not hasattr(module, "CONFIG_NAME"):
        raise ValueError(f"experiment {exp.name}: {exp.app} is not a sampling app (no run_dir/CONFIG_NAME)")
    return module


def run_dirs(exp: Experiment, pts: list[Point], check: bool = True) -> dict[Point, Path]:
    """Where each point's app writes (the app's own ``run_dir`` on the composed config), after composing and
    checking every point's configuration (the app's ``check_config``: every key and value, the calibration's
    match) so that a bad point fails the sweep in one line before anything is launched; two points that
    would share a folder are refused (they would be one run)."""
    from hydra import compose, initialize_config_dir

    module = app_module(exp)
    out: dict[Point, Path] = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        for point in pts:
            config_overrides = [o for o in point.overrides if not o.startswith(("hydra.", "hydra/", "++hydra."))]
            try:
                cfg = compose(config_name=module.CONFIG_NAME, overrides=config_overrides)
                if check and hasattr(module, "check_config"):
                    module.check_config(cfg)
                out[point] = Path(module.run_dir(cfg))
            except Exception as err:  # noqa: BLE001 - Hydra's, OmegaConf's and the app's errors alike: one line
                raise ValueError(f"experiment {exp.name}, block {point.block!r}, point "
                                 f"{' '.join(point.overrides)}: {_one_line(err)} (nothing was launched)") from err
    seen: dict[Path, Point] = {}
    for point, path in out.items():
        if path in seen:
            raise ValueError(f"experiment {exp.name}: points {seen[path].overrides} and {point.overrides} write the "
                             f"same run folder {path}; make the blocks differ")
        seen[path] = point
    return out


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0] not in text:
        text += f": {str(cause).strip().splitlines()[0]}"  # Hydra wraps the real reason
    return text


# Every job of a sweep leaves <sweep dir>/<job num>/job_failed.json when it fails, whatever the launcher
CALLBACK = f"++hydra.callbacks.sweep_failures._target_={SweepFailures.__module__}.{SweepFailures.__name__}"


def sample(exp: Experiment, extra: list[str], table_dir: Path) -> dict[str, int]:
    """Launch every block as one Hydra multirun; returns each block's exit status."""
    status = {}
    for block, sweep in exp.blocks.items():
        cmd = [sys.executable, "-m", exp.app, "--multirun", *exp.common, *sweep, *extra, CALLBACK,
               f"hydra.sweep.dir={table_dir / 'multirun' / block}"]
        print(f"[{TAG}] {exp.name}/{block}: {' '.join(cmd[3:])}", flush=True)
        status[block] = subprocess.run(cmd).returncode  # in the user's folder: relative paths mean the same
        if status[block]:
            print(f"[{TAG}] {exp.name}/{block}: exit status {status[block]} (a job failed: its traceback is above, "
                  f"its log under {table_dir / 'multirun' / block}); going on", file=sys.stderr, flush=True)
    return status


def job_failures(table_dir: Path) -> dict[frozenset, str]:
    """The reason every failed job of the sweep gave (its ``job_failed.json``), by its overrides."""
    out = {}
    for record in sorted((table_dir / "multirun").glob(f"*/*/{FAILURE_RECORD}"), key=lambda p: p.stat().st_mtime):
        data = runs.read_json(record) or {}
        overrides = _normalized(data.get("overrides") or [])
        error = " ".join(str(data.get("error", "")).split()) or "(no message)"
        out[overrides] = f"{data.get('error_type', 'Error')}: {error} (log: {data.get('stderr', record)})"
    return out


def _normalized(overrides) -> frozenset:
    """Overrides as (key, value) pairs parsed by Hydra's grammar: ``progress=false`` and the ``progress=False``
    a job records are the same."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = [str(o) for o in overrides if not str(o).lstrip("+").startswith(("hydra.", "hydra/"))]
    try:
        parsed = OverridesParser.create().parse_overrides(kept)
    except Exception:  # noqa: BLE001 - not parseable: compare the text
        return frozenset(kept)
    return frozenset((o.get_key_element(), repr(o.value())) for o in parsed)


def failure_reason(point: Point, failures: dict[frozenset, str]) -> str | None:
    return failures.get(_normalized(point.overrides))


def evaluate(exp: Experiment, dirs: dict[Point, Path], table_dir: Path | None = None) -> dict[str, str]:
    """Every metric on every finished run folder; returns errors by run folder (for a point whose run did
    not finish: the reason its job gave)."""
    from .cli import main as eval_main

    failures = job_failures(table_dir) if table_dir is not None else {}
    reference = None
    if exp.reference is not None:
        reference = next(path for point, path in dirs.items() if point.block == exp.reference)
    errors: dict[str, str] = {}
    for point, path in dirs.items():
        metrics = runs.read_json(path / "metrics.json")
        if not metrics or metrics.get("complete") is False:
            errors[str(path)] = failure_reason(point, failures) or (
                "no finished run folder" if not metrics else
                f"incomplete: {metrics.get('num_items')} of {metrics.get('num_samples', '?')} outputs")
            continue
        for spec in exp.metrics:
            paired = any("{reference}" in a for a in spec)
            if paired and (reference is None or path == reference):
                continue
            if _fresh(metrics, spec[0], metrics.get("num_items")):
                continue
            argv = [spec[0], str(path), *[a.replace("{reference}", str(reference)) for a in spec[1:]]]
            try:
                eval_main(argv)
            except (Exception, SystemExit) as err:  # noqa: BLE001 - one bad metric marks its row, the rest go on
                errors[str(path)] = f"{spec[0]}: {err}"
                print(f"[{TAG}] metric {spec[0]} failed on {path}: {err}", file=sys.stderr)
    return errors


_STORED_AS = {"inception": ("is",), "clip": ("clip_score",)}


def _fresh(metrics: dict, metric: str, num_items) -> bool:
    stored = metrics.get("eval") or {}
    names = _STORED_AS.get(metric, (metric,))
    return all(n in stored and stored[n].get("num_items") == num_items for n in names)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bash scripts/sweep.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help=f"one of {sorted(p.stem for p in EXPERIMENTS.glob('*.yaml'))}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. hydra/launcher=slurm")
    parser.add_argument("--stage", choices=("all", *STAGES), default="all", help="run one stage only")
    args = parser.parse_args(argv)
    exp = load_experiment(args.experiment)
    extra = list(args.overrides)
    if not any(o.startswith("out_root=") for o in extra):
        extra.append(f"out_root={Path('runs') / 'tables' / exp.name}")
    table_dir = Path(next(o for o in extra if o.startswith("out_root=")).split("=", 1)[1])
    pts = points(exp, extra)
    dirs = run_dirs(exp, pts, check=args.stage in ("all", "sample"))  # every point checked before any launch
    print(f"[{TAG}] {exp.name}: {len(pts)} runs in {len(exp.blocks)} blocks -> {table_dir}")
    state = {"experiment": exp.name, "points": [{"block": p.block, "overrides": list(p.overrides),
                                                 "run_dir": str(d)} for p, d in dirs.items()]}
    if args.stage in ("all", "sample"):
        state["sample_status"] = sample(exp, extra, table_dir)
    if args.stage in ("all", "metrics"):
        state["metric_errors"] = evaluate(exp, dirs, table_dir)
    if args.stage in ("all", "table"):
        from .aggregate import rows_of, write_table

        errors = state.get("metric_errors")
        if errors is None:  # the table alone: the failed jobs' reasons are still on disk
            failures = job_failures(table_dir)
            errors = {str(path): reason for point, path in dirs.items()
                      if (reason := failure_reason(point, failures)) is not None}
        state["table"] = {k: str(v) for k, v in write_table(exp, dirs, table_dir, errors).items()}
        state["failed_points"] = [row["run"] for row in rows_of(exp, dirs, errors) if row["status"] != "ok"]
    elif args.stage == "sample":
        state["failed_points"] = [block for block, status in state["sample_status"].items() if status]
    runs.write_json(table_dir / "sweep.json", state)
    return state


@runs.clear_errors(TAG)
def cli() -> None:
    state = main()
    failed = state.get("failed_points") or []
    if failed:
        print(f"[{TAG}] error: {len(failed)} of {len(state['points'])} points did not finish ok: "
              f"{', '.join(failed[:4])}{' ...' if len(failed) > 4 else ''} (the table's status column says why)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
