"""Readable results: markdown tables, CSV files and quality-vs-speedup plots from rows of dicts."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from taylorseer.harness.runs import atomic_write, write_text


def _fmt(value, digits: int) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 1:  # small values keep 3 significant digits (TFLOPs of a tiny model, errors)
            return f"{value:.{max(digits, 3)}g}"
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                   digits: int = 2) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def quality_vs_speedup_plot(path: str | Path, rows: Sequence[dict], x: str, y: str, group: str,
                            label: str | None = None, title: str = "", xlabel: str = "", ylabel: str = "") -> Path:
    """One line per ``group`` value (e.g. method), points sorted by ``x``, each annotated by ``label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name in dict.fromkeys(r[group] for r in rows):
        pts = sorted((r for r in rows if r[group] == name and r.get(x) is not None and r.get(y) is not None),
                     key=lambda r: r[x])
        ax.plot([r[x] for r in pts], [r[y] for r in pts], marker="o", label=str(name))
        for r in pts if label else ():
            ax.annotate(str(r[label]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out
