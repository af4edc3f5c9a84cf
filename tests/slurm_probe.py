"""A tiny entry point the distributed, launcher and Slurm tests start under torchrun, srun or alone.

    python tests/slurm_probe.py --out report.json [--items 10] [--mode ok|setting-error|crash|late] [--device cpu]

``ok``: joins the ranks through :func:`taylorseer.harness.distributed.init`, takes its shard of ``--items``,
checks the group really works (an all-reduce of the shard sizes), gathers every rank's view to rank 0,
which writes ``--out`` (atomically). ``setting-error``: fails the way an app's bad setting does, one line
from rank 0 only and exit status 2. ``crash``: rank ``--bad-rank`` raises (a bug: traceback, exit 1).
``late``: rank ``--bad-rank`` sleeps ``--sleep`` s before the barrier (timeouts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from taylorseer.harness import (
    distributed,  # noqa: E402
    runs,  # noqa: E402
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--mode", default="ok", choices=["ok", "setting-error", "crash", "late"])
    parser.add_argument("--bad-rank", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--barrier-timeout", type=float, default=None)
    args = parser.parse_args(argv)

    if args.mode == "setting-error":
        if distributed.is_main_process():
            print("[probe] error: items=-1 is invalid: expected >= 0", file=sys.stderr)
        return 2
    with distributed.init(args.device, timeout_s=args.timeout) as session:
        if args.mode == "crash" and session.rank == args.bad_rank:
            raise RuntimeError(f"probe crashed on purpose on rank {session.rank}")
        mine = session.shard(range(args.items))
        total = torch.tensor([len(mine)], device=session.device)  # nccl reduces CUDA tensors only
        if session.backend is not None:
            dist.all_reduce(total)
        if args.mode == "late" and session.rank == args.bad_rank:
            time.sleep(args.sleep)
        session.barrier(args.barrier_timeout)
        view = {"rank": session.rank, "world_size": session.world_size, "local_rank": session.local_rank,
                "local_world_size": session.env.local_world_size, "source": session.env.source,
                "backend": session.backend, "device": str(session.device),
                "master": f"{session.env.master_addr}:{session.env.master_port}", "items": mine,
                "total_items": int(total.item()), "pid": os.getpid()}
        views = session.gather(view)
        if session.is_main and args.out is not None:
            runs.write_json(args.out, {"views": views})
    return 0


if __name__ == "__main__":
    sys.exit(main())
