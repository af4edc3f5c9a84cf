"""Benchmark prompt files (one prompt per line, what ``prompt_file=`` of the sampling apps reads).

DrawBench (Saharia et al. 2022, 200 prompts in 11 categories) is not shipped by any PyPI package we found
(image-reward 1.5 and cache-dit 1.5.3 wheels checked; others read it from the hub). Get it once where
there is network, e.g. ``huggingface-cli download Jialuo21/DrawBench data/test-00000-of-00001.parquet
--repo-type dataset --local-dir drawbench`` (columns ``prompts``, ``category``) or the original
Google-Sheet CSV (columns ``Prompts``, ``Category``), then convert it here:

    bash scripts/eval.sh prompts drawbench --source drawbench/data/test-00000-of-00001.parquet -o drawbench.txt

VBench's list ships in the vbench wheel: ``bash scripts/eval.sh prompts vbench -o vbench_prompts.txt``.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from taylorseer.harness.runs import write_text

DRAWBENCH_SIZE = 200
PROMPT_COLUMNS = ("prompts", "prompt", "Prompts", "Prompt", "text")


def read_table(source: str | Path) -> list[str]:
    """The prompt column of a CSV/TSV/parquet/JSON-lines file, or the lines of a text file."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--source {path} does not exist (download DrawBench first: see the README)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ValueError("reading a .parquet file needs pyarrow: `pip install pyarrow` (or export the table "
                             "to CSV)") from err
        table = pq.read_table(path).to_pydict()
        rows = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        import json

        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    column = next((c for c in PROMPT_COLUMNS if c in rows[0]), None)
    if column is None:
        raise ValueError(f"{path} has no prompt column: expected one of {PROMPT_COLUMNS}, found {list(rows[0])}")
    return [" ".join(str(row[column]).split()) for row in rows]


def write_drawbench(source: str | Path, out: str | Path, allow_other_size: bool = False) -> dict:
    """Write DrawBench's prompts (in the source's order, line breaks folded) as a prompt file."""
    prompts = read_table(source)
    if len(prompts) != DRAWBENCH_SIZE and not allow_other_size:
        raise ValueError(f"{source} holds {len(prompts)} prompts, DrawBench has {DRAWBENCH_SIZE}: is it DrawBench? "
                         f"(--allow-other-size writes it anyway)")
    if not all(prompts):
        raise ValueError(f"{source} holds an empty prompt")
    write_text(out, "".join(p + "\n" for p in prompts))
    return {"prompts": len(prompts), "distinct": len(set(prompts)), "source": str(source), "out": str(out)}


def prompt_coverage(prompts_in_run: list[str | None], prompt_file: str | Path) -> dict:
    """How much of a benchmark's prompt file a run covers (recorded beside a prompt-based metric)."""
    path = Path(prompt_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    expected = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    have = set(prompts_in_run)
    missing = [p for p in dict.fromkeys(expected) if p not in have]
    return {"prompt_file": str(path), "prompt_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            "prompts_expected": len(set(expected)), "prompts_missing": len(missing), "complete": not missing,
            "extra_prompts": len(have - set(expected))}
