"""A sweep's run folders as the paper's table: one row per point, failed points marked, never dropped.

Columns: method (the experiment's block), N, O, steps, full steps, TFLOPs per output, FLOPs compression (against
the reference run's FLOPs when the experiment has one, so a run with fewer sampling steps shows its saving),
latency per output and wall speedup against the reference block (the uncached run, same machine and
sweep), every metric the experiment lists (``<metric>.<number>`` inside ``metrics.json["eval"]``), and
the status: ``ok``, ``incomplete k/n`` (a run killed or still going: its numbers cover what is there),
``failed: <why>`` (no run folder or no metrics: the job's log is under ``multirun/<block>/``), or
``stale <metric>`` (the metric was computed on fewer outputs than the folder now holds).
Everything in a row is read from its run folder, so the table can be rebuilt at any time.
"""

from __future__ import annotations

from pathlib import Path

from taylorseer.harness import runs

from .report import markdown_table, quality_vs_speedup_plot, write_csv

BASE_COLUMNS = ["method", "N", "O", "steps", "full_steps", "tflops", "compression", "latency_s", "wall_speedup"]
BASE_HEADERS = ["method", "N", "O", "steps", "full steps", "TFLOPs", "FLOPs compr.", "latency (s)", "wall speedup"]


def _lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def row_of(block: str, path: Path, metric_columns: list[str], error: str | None = None) -> dict:
    """One table row from one run folder."""
    metrics = runs.read_json(path / "metrics.json")
    row = {"method": block, "run": path.name}
    if not metrics:
        row["status"] = "failed: " + (error or f"no metrics.json in {path}")
        return row
    cache = metrics.get("cache") or {}
    on = cache.get("enabled", False)
    interval_rule = cache.get("schedule", "interval") == "interval"  # N means nothing to the other schedules
    row.update(N=cache.get("interval") if on and interval_rule else None, O=cache.get("max_order") if on else None,
               steps=metrics.get("num_steps"), full_steps=metrics.get("full_steps"),
               tflops=metrics["flops_total"] / 1e12 if metrics.get("flops_total") else None,
               compression=metrics.get("compression"), latency_s=metrics.get("latency_s"),
               num_items=metrics.get("num_items"))
    evals = metrics.get("eval") or {}
    stale = []
    for column in metric_columns:
        row[column] = _lookup(evals, column)
        entry = evals.get(column.split(".")[0]) or {}
        if entry and entry.get("num_items") != metrics.get("num_items"):
            stale.append(column.split(".")[0])
    if metrics.get("complete") is False:
        row["status"] = f"incomplete {metrics.get('num_items')}/{metrics.get('num_samples', '?')}"
    elif error:
        row["status"] = f"failed: {error}"
    elif stale:
        row["status"] = "stale " + ", ".join(sorted(set(stale)))
    else:
        row["status"] = "ok"
    return row


def rows_of(exp, dirs: dict, errors: dict | None = None) -> list[dict]:
    columns = list(exp.table.get("columns") or [])
    rows = [row_of(point.block, path, columns, (errors or {}).get(str(path))) for point, path in dirs.items()]
    if exp.reference is not None:
        ref = next((r for (point, _), r in zip(dirs.items(), rows, strict=True) if point.block == exp.reference), None)
        for row in rows:
            if ref and ref.get("latency_s") and row.get("latency_s"):
                row["wall_speedup"] = ref["latency_s"] / row["latency_s"]
            if ref and ref.get("tflops") and row.get("tflops"):
                # against the reference run, so that fewer sampling steps count as the saving they are
                row["compression"] = ref["tflops"] / row["tflops"]
    return rows


def write_table(exp, dirs: dict, table_dir: Path, errors: dict | None = None) -> dict[str, Path]:
    """``table.md``, ``table.csv`` and (when the experiment names its axes) ``table.png`` in ``table_dir``."""
    rows = rows_of(exp, dirs, errors)
    columns = list(exp.table.get("columns") or [])
    headers = list(exp.table.get("headers") or columns)
    all_columns, all_headers = BASE_COLUMNS + columns + ["status"], BASE_HEADERS + headers + ["status"]
    title = f"{exp.name}: {exp.description}".strip().rstrip(":")
    table = markdown_table(rows, all_columns, all_headers, digits=int(exp.table.get("digits", 2)))
    out = {"md": runs.write_text(table_dir / "table.md", f"{title}\n\n{table}"),
           "csv": write_csv(table_dir / "table.csv", rows, all_columns + ["num_items", "run"])}
    plot = exp.table.get("plot")
    if plot:
        x, y = plot
        points = [r for r in rows if r.get(x) is not None and r.get(y) is not None and r["method"] != exp.reference]
        if points:
            out["png"] = quality_vs_speedup_plot(table_dir / "table.png", points, x, y, "method", label="N",
                                                 title=exp.description or exp.name, xlabel=dict(zip(all_columns,
                                                 all_headers, strict=True)).get(x, x),
                                                 ylabel=dict(zip(all_columns, all_headers, strict=True)).get(y, y))
    print(f"{title}\n\n{table}", end="")
    print(f"[sweep] table in {out['md']}")
    return out
