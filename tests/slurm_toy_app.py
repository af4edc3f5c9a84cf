"""A toy Hydra app shaped like the sampling apps, for the launcher and Slurm tests.

    python tests/slurm_toy_app.py --multirun hydra/launcher=slurm a=1,2 b=1,2 num_items=8

Each run "samples" ``num_items`` items into its run folder ``<out_root>/toy/a<a>-b<b>/`` data-parallel over
the ranks :mod:`taylorseer.harness.distributed` finds (a job's Slurm tasks, torchrun's processes, or one):
every rank makes its shard, skipping items already there (resume after a kill or a requeue), each
item written atomically, and each item made is also appended to ``made.log`` (item, rank, attempt) so
a test can count how often an item was made. Rank 0 alone writes the shared ``summary.json`` once
every rank is done. ``fail=true`` raises in the job (a bug); ``item_seconds`` slows it down so a test
can interrupt it.

It includes the project's ``base`` config (run folders, Hydra output settings) and finds the
project's launchers (``configs/hydra/launcher``) through the search path, as the real apps do.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from taylorseer.harness import distributed, runs  # noqa: E402

ConfigStore.instance().store(name="toy", node={
    "defaults": ["base", "_self_"],
    "a": 1,
    "b": 1,
    "num_items": 8,
    "item_seconds": 0.0,
    "fail": False,
    "timeout_s": 120.0,
    "device": "cpu",  # a CPU app (device=auto: a "GPU run" that requests a GPU per rank and runs on the CPU here)
    # as the apps' configs/parallel: the launcher sizes a job for ulysses x ring ranks (the toy shards over all)
    "parallel": {"ulysses": 1, "ring": 1},
    "hydra": {"searchpath": [f"file://{REPO / 'configs'}"], "job": {"name": "toy"}},
})


def value(a: int, b: int, item: int) -> int:
    """What item ``item`` of run (a, b) must hold: a test recomputes it."""
    return 1000 * a + 100 * b + item


def run(cfg: DictConfig) -> dict:
    degree = cfg.parallel.ulysses * cfg.parallel.ring  # in the name: a test checks runs of each degree apart
    out_dir = Path(cfg.out_root) / "toy" / (f"a{cfg.a}-b{cfg.b}" + (f"-k{degree}" if degree > 1 else ""))
    with distributed.init(cfg.device, timeout_s=cfg.timeout_s) as session:
        if cfg.fail:
            raise RuntimeError(f"toy run a={cfg.a} b={cfg.b} fails on purpose")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        made = []
        for item in session.shard(range(cfg.num_items)):
            path = out_dir / "items" / f"{item:04d}.json"
            if path.exists():
                continue  # made before a kill or a requeue
            time.sleep(cfg.item_seconds)
            runs.write_json(path, {"item": item, "value": value(cfg.a, cfg.b, item), "rank": session.rank,
                                   "world_size": session.world_size, "attempt": attempt})
            with open(out_dir / "made.log", "a") as log:  # O_APPEND: whole lines from every rank
                log.write(f"{item} {session.rank} {attempt}\n")
            made.append(item)
        session.barrier()  # every rank done before rank 0 writes what covers all of them
        views = session.gather({"rank": session.rank, "made": made, "source": session.env.source})
        summary = {"a": cfg.a, "b": cfg.b, "world_size": session.world_size, "ranks": views,
                   "job_id": os.environ.get("SLURM_JOB_ID"), "attempt": attempt,
                   "setup": os.environ.get("TOY_SETUP"),  # set by a launcher setup line in the tests
                   "gpus_on_node": os.environ.get("SLURM_GPUS_ON_NODE")}  # what Slurm gave the job
        if session.is_main:
            runs.write_json(out_dir / "summary.json", summary)
    return summary


@hydra.main(config_path=None, config_name="toy", version_base=None)
def main(cfg: DictConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    main()
