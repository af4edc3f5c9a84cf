"""Context parallelism (taylorseer.attach.parallel) on gloo CPU ranks: tiny FLUX, HunyuanVideo and Wan transformers
give the one-process output within fp32 rounding with the cache off and on (interval O = 0, 1, 2; adaptive), every
rank makes the one-process full/forecast decisions and holds 1/K of its factor bytes; data parallel x context
parallel on 4 ranks; bad degrees and backends are refused before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taylorseer.attach import families, parallel

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOLERANCE = 1e-5  # fp32: the all-to-all reorders no sum, but attention's kernels see other shapes


def _launch(tmp_path, nproc: int, ulysses: int, families_: str = "flux,hunyuan_video,wan") -> list[dict]:
    out = tmp_path / f"cp{nproc}x{ulysses}.json"
    run = subprocess.run([sys.executable, "-m", "taylorseer.harness.launch", "--standalone", "--nproc_per_node",
                          str(nproc), str(ROOT / "tests" / "cp_worker.py"), "--ulysses", str(ulysses),
                          "--families", families_, "--out", str(out)],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def _check(rows: list[dict], ulysses: int, nproc: int) -> None:
    assert {r["rank"] for r in rows} == set(range(nproc))
    for r in rows:
        what = f"{r['family']} {r['config']} rank {r['rank']}"
        assert r["max_diff"] <= TOLERANCE, f"{what}: {r['max_diff']:.2e} from the one-process output"
        assert r["full"] == r["full_one"], f"{what}: decisions {r['full']} != one process {r['full_one']}"
        assert r["nbytes"] * ulysses == r["nbytes_one"], f"{what}: {r['nbytes']} bytes, one process {r['nbytes_one']}"
    for family in {r["family"] for r in rows}:  # every rank of a generation made the same decisions
        for config in {r["config"] for r in rows}:
            assert len({json.dumps(r["full"]) for r in rows if (r["family"], r["config"]) == (family, config)}) == 1


def test_two_ranks_equal_one_process_with_the_cache_off_and_on(tmp_path):
    rows = _launch(tmp_path, 2, 2)
    _check(rows, 2, 2)
    assert {r["family"] for r in rows} == {"flux", "hunyuan_video", "wan"}
    assert {r["config"] for r in rows} == {"off", "interval-O0", "interval-O1", "interval-O2", "adaptive-O1"}
    adaptive = next(r for r in rows if r["config"] == "adaptive-O1" and r["family"] == "flux")
    interval = next(r for r in rows if r["config"] == "interval-O1" and r["family"] == "flux")
    assert adaptive["full"] != interval["full"]  # the probe decided (not the interval rule alone)


@pytest.mark.slow
@pytest.mark.parametrize("ulysses", [4, 2], ids=["cp4", "dp2xcp2"])
def test_four_ranks(tmp_path, ulysses):
    rows = _launch(tmp_path, 4, ulysses)
    _check(rows, ulysses, 4)
    groups = {r["group"] for r in rows}
    assert groups == set(range(4 // ulysses))
    if len(groups) > 1:  # each generation its own inputs: the groups made different outputs
        sums = {g: {r["sum"] for r in rows if r["group"] == g and r["config"] == "off" and r["family"] == "flux"}
                for g in groups}
        assert all(len(s) == 1 for s in sums.values()) and sums[0] != sums[1]


# ------------------------------------------------------------------------------------------ before any compute
def test_layout_splits_the_world_into_generations():
    layouts = [parallel.Layout(rank, 8, 4) for rank in range(8)]
    assert [(lay.group, lay.local, lay.writes) for lay in layouts[3:5]] == [(0, 3, False), (1, 0, True)]
    items = list(range(5))
    shares = [parallel.Layout(rank, 8, 4).shard(items) for rank in range(8)]
    assert shares[0] == shares[3] == [0, 2, 4] and shares[4] == shares[7] == [1, 3]
    with pytest.raises(parallel.ContextParallelError, match="does not divide the 6 ranks"):
        parallel.Layout(0, 6, 4)


def test_bad_degrees_and_backends_are_refused():
    model = families.build("flux", "smoke")  # 2 heads
    with pytest.raises(parallel.ContextParallelError, match="does not divide the 2 attention heads"):
        parallel.check(model, ulysses=4)
    with pytest.raises(parallel.ContextParallelError, match="63 image tokens are not divisible"):
        parallel.check(model, ulysses=2, tokens={"image": 63, "text": 16})
    with pytest.raises(parallel.ContextParallelError, match="log-sum-exp"):
        parallel.check(model, ulysses=1, ring=2)
    with pytest.raises(parallel.ContextParallelError, match="at least 2"):
        parallel.check(model, ulysses=1)
    parallel.check(families.build("hunyuan_video", "smoke"), ulysses=2, tokens={"video": 8, "text": 8})
    model.set_attention_backend("_native_math")
    try:
        with pytest.raises(parallel.ContextParallelError, match="cannot do context parallelism"):
            parallel.check(model, ulysses=2)
    finally:
        model.reset_attention_backend()


def test_enable_needs_the_process_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(parallel.ContextParallelError, match="process group"):
        parallel.enable(families.build("flux", "smoke"), ulysses=2)


def test_inner_input_splits_run_before_any_forward():
    engine, inner = parallel._outside_forward(parallel.plan_for(families.build("wan", "smoke")))
    assert list(inner) == ["blocks.0"] and "blocks.0" not in engine and "proj_out" in engine
    assert set(parallel.PLANS["HunyuanVideoTransformer3DModel"]) == {"rope", "x_embedder", "context_embedder",
                                                                     "proj_out"}
