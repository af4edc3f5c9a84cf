"""The benchmark command and the GPU script run end to end on tiny models (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from taylorseer.core import kernels as fused

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_runs_every_variant_of_every_model(one_thread, tmp_path):
    from taylorseer_eval.benchmark import main

    result = main(["--smoke", "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    rows = {(r["family"], r["variant"]): r for r in result["rows"]}
    new = ("qwenimage", "flux2", "ltx", "hunyuan_video15", "sana", "lumina2", "cogview4")  # issue 19's presets
    families = ("dit", "flux", "hunyuan_video", "wan", "sd3", "pixart", "cogvideox") + new
    expected = {(f, v) for f in families for v in ("uncached", "ours O=0", "ours O=1", "ours O=2", "ideal")}
    # diffusers' own hook where the model has CacheMixin (not SD3, PixArt, Sana, Lumina2, nor this project's DiT)
    expected |= {(f, "diffusers") for f in ("flux", "hunyuan_video", "wan", "cogvideox", "qwenimage", "flux2", "ltx",
                                            "hunyuan_video15", "cogview4")}
    assert set(rows) == expected
    assert all(r["error"] is None and len(r["times"]) == 1 for r in rows.values())
    # The schedules of 8 steps: DiT N=4 W=2 -> 0, 1, 5; FLUX N=6 W=3 -> 0, 1, 2; HunyuanVideo and Wan N=5 W=1 ->
    # 0, 5; SD3, PixArt, CogVideoX and the families after them N=5 W=2 -> 0, 1, 6.
    full_steps = {"dit": 3, "flux": 3, "hunyuan_video": 2, "wan": 2}
    for family in families:
        full = full_steps.get(family, 3)
        assert rows[family, "uncached"]["error"] is None
        for v in ("ours O=0", "ours O=1", "ours O=2", "ideal"):
            assert rows[family, v]["full_steps"] == full
            assert rows[family, v]["forecast_step_s"] is not None and rows[family, v]["full_step_s"] > 0
        assert rows[family, "uncached"]["rel_error"] == 0.0
        assert rows[family, "ideal"]["of_ideal"] == pytest.approx(1.0)
        # Factors held: O+1 per feature once enough full steps formed derivatives; in 8 steps FLUX (derivatives
        # from step 2 on) and HunyuanVideo (full steps 0 and 5) reach order 1 only.
        per_factor = rows[family, "ours O=0"]["cache_bytes"]
        assert rows[family, "ours O=1"]["cache_bytes"] == 2 * per_factor > 0
        orders_reached = 2 if family in ("flux", "hunyuan_video", "wan") else 3  # full steps 0, 5 vs 0, 1, 6
        assert rows[family, "ours O=2"]["cache_bytes"] == orders_reached * per_factor
    for family in ("flux", "hunyuan_video") + new:  # forecasting stays closer to the model than skipping blocks
        assert rows[family, "ours O=1"]["rel_error"] < rows[family, "ideal"]["rel_error"]
    table = (tmp_path / "b.md").read_text()
    assert "| flux | diffusers |" in table and "forecast step / full step" in table
    assert json.loads((tmp_path / "b.json").read_text())["setup"]["size"] == "smoke"


FAKE_FLASH = """
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, *args, **kwargs):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
"""


@pytest.mark.skipif(not fused._has_cxx(), reason="the dry run compiles (inductor needs a C++ compiler)")
def test_gpu_script_dry_run_covers_every_code_path(tmp_path):
    # A stand-in flash-attn: the DiT takes it, diffusers' own requirement check refuses it -> an error row.
    fake = tmp_path / "fake" / "flash_attn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent(FAKE_FLASH))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHON", None)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "scripts/bench_gpu.sh"), "--dry-run", "--out", str(out),
                             "--compile-models", "dit"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "attention backends here: sdpa, flash" in result.stdout
    data = json.loads((out / "bench_gpu.json").read_text())
    rows = {(r["family"], r["variant"]): r for r in data["rows"]}
    for family in ("dit", "flux", "hunyuan_video"):
        for v in ("uncached", "ours O=1", "ours O=2", "ideal"):
            assert rows[family, v]["error"] is None and rows[family, v]["times"], (family, v)
    for v in ("uncached compiled", "ours O=1 compiled", "ours O=2 compiled", "ideal compiled"):
        assert rows["dit", v]["error"] is None and rows["dit", v]["compile_s"] > 0
        assert rows["dit", v]["rel_error"] < 1e-3
    assert rows["dit", "ours O=1 flash"]["error"] is None  # the DiT's own attention option took it
    error = rows["flux", "uncached flash"]["error"]
    assert error.startswith("AttentionBackendError: attention_backend=flash cannot be used by FluxTransformer2DModel")
    assert "| flux | uncached flash | AttentionBackendError" in (out / "bench_gpu.md").read_text()
    assert data["setup"]["device"].startswith("CPU")
