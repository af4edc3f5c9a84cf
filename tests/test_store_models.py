"""The 8-bit factor store on the real models: the tiny FLUX and HunyuanVideo pipelines (saved and loaded like
the real ones), the bundled digits DiT, the apps' run folders, and the full-size byte counts on the meta
device. Fidelity thresholds leave room over what ``python -m taylorseer_eval.store_fidelity`` measured
(docs/memory.md) but not for a broken store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from taylorseer import CacheConfig
from taylorseer.core.store import stored_nbytes

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------------------------------- FLUX
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """run(config=None, steps=50) -> (final latents, cache bytes) of the tiny FLUX pipeline (the store fidelity
    script's own sampler, so the figures in docs/memory.md and these checks run the same code)."""
    from taylorseer_eval.store_fidelity import flux_pipeline_sampler

    return flux_pipeline_sampler(tmp_path_factory.mktemp("tiny_flux"))


def test_flux_pipeline_with_8bit_factors(flux):
    from tiny_flux import TINY_TRANSFORMER

    paper = dict(interval=6, max_order=1, first_enhance=3)
    uncached, _ = flux()
    fp32, fp32_bytes = flux(CacheConfig(**paper))
    f8, f8_bytes = flux(CacheConfig(**paper, factor_store="float8"))
    # Bytes: per image token of each cached tensor, 32 fp32 values -> 32 bytes + one fp32 scale.
    hidden = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    assert f8_bytes * hidden * 4 == fp32_bytes * (hidden + 4)
    # The store's own error is a fraction of the forecast's: the store does not change what the cache does.
    forecast_error, store_error = rel(fp32, uncached), rel(f8, fp32)
    assert 0 < store_error < 0.5 * forecast_error, (store_error, forecast_error)
    assert rel(f8, uncached) < 1.5 * forecast_error


# ---------------------------------------------------------------------------------------------- Hunyuan
@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    from taylorseer_eval.store_fidelity import hunyuan_pipeline_sampler

    return hunyuan_pipeline_sampler(tmp_path_factory.mktemp("tiny_hunyuan"))


def test_hunyuan_pipeline_with_8bit_factors(hunyuan):
    # The single blocks slice a stored factor into video and text tokens (ScaledFactor.__getitem__).
    paper = dict(interval=5, max_order=1, first_enhance=1)
    uncached, _ = hunyuan()
    fp32, fp32_bytes = hunyuan(CacheConfig(**paper))
    f8, f8_bytes = hunyuan(CacheConfig(**paper, factor_store="float8"))
    assert f8_bytes * 32 * 4 == fp32_bytes * (32 + 4)  # hidden 32: 32 bytes + a 4-byte scale per token
    forecast_error, store_error = rel(fp32, uncached), rel(f8, fp32)
    assert 0 < store_error < 0.5 * forecast_error, (store_error, forecast_error)


def test_hunyuan_offload_with_8bit_factors_is_exact(hunyuan):
    config = dict(interval=3, max_order=2, first_enhance=1, factor_store="float8")
    kept, kept_bytes = hunyuan(CacheConfig(**config), steps=12)
    moved, moved_bytes = hunyuan(CacheConfig(**config, offload=True, prefetch=True), steps=12)
    assert torch.equal(kept, moved) and kept_bytes == moved_bytes > 0


def test_hunyuan_meta_estimate_counts_the_scales():
    from tiny_hunyuan import TRANSFORMER_CONFIG

    from taylorseer_hunyuan_video.flops import VideoShape, estimate_cache

    dense = estimate_cache(2, VideoShape(32, 32, 5, 16), "bfloat16", TRANSFORMER_CONFIG, single_attention=False)
    f8 = estimate_cache(2, VideoShape(32, 32, 5, 16), "bfloat16", TRANSFORMER_CONFIG, single_attention=False,
                        factor_store="float8")
    assert f8.nbytes == f8.formula_nbytes and dense.nbytes == dense.formula_nbytes
    # hidden 32: each stored token is 32 bf16 values -> 32 bytes + one fp32 scale
    assert dense.nbytes * (32 + 4) == f8.nbytes * 32 * 2


@pytest.mark.slow
def test_full_size_hunyuan_video_cache_with_8bit_factors():
    from taylorseer_hunyuan_video.flops import VideoShape, estimate_cache

    for order in (1, 2):
        est = estimate_cache(order, VideoShape(), factor_store="float8")
        # the lean default: (O+1) x (20 double x 2 + 40 single) tensors x 20,400 video tokens x (3072 bytes + a
        # 4-byte scale)
        assert est.nbytes == est.formula_nbytes == (order + 1) * 80 * 20400 * (3072 + 4)
        est = estimate_cache(order, VideoShape(), single_attention=False, factor_store="float8",
                             forecast_step="per_block")  # upstream's form: the same units over 20,656 tokens
        assert est.nbytes == est.formula_nbytes == (order + 1) * 80 * 20656 * (3072 + 4)
    assert estimate_cache(1, VideoShape(), factor_store="float8").nbytes == 10_040_064_000
    assert estimate_cache(1, VideoShape(), single_attention=False, factor_store="float8",
                          forecast_step="per_block").nbytes == 10_166_056_960


def test_full_size_flux_dev_cache_on_meta():
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, flux_cache_bytes

    # default (the flux preset, text stream not forecast): double blocks store the image outputs of attn and
    # ff (4096 tokens each), single blocks their image part (4096)
    tokens = 19 * (4096 + 4096) + 38 * 4096
    config = CacheConfig(interval=6, max_order=1, first_enhance=3, factor_dtype="bfloat16")
    assert flux_cache_bytes(FLUX_DEV_TRANSFORMER, config) == 2 * tokens * 3072 * 2 == 3_825_205_248
    f8 = CacheConfig(interval=6, max_order=1, first_enhance=3, factor_dtype="bfloat16", factor_store="float8")
    assert flux_cache_bytes(FLUX_DEV_TRANSFORMER, f8) == 2 * tokens * (3072 + 4) == 1_915_092_992
    assert stored_nbytes((1, 4096, 3072), 2, "float8") == 2 * 4096 * (3072 + 4)


# ------------------------------------------------------------------------------------------------ apps
def test_the_flux_app_names_the_store_in_its_run_folder(tmp_path):
    from hydra import compose, initialize_config_dir
    from tiny_flux import IMAGE_SIZE, TEXT_TOKENS, save_tiny_flux

    from taylorseer_flux.sample import CONFIG_DIR, main

    tiny = save_tiny_flux(tmp_path / "tiny")
    overrides = [f"model.path={tiny}", f"out_root={tmp_path}", f"height={IMAGE_SIZE}", f"width={IMAGE_SIZE}",
                 f"max_sequence_length={TEXT_TOKENS}", "progress=false", "device=cpu", "warmup=false",
                 "num_steps=12", "cache.factor_store=float8"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="sample_flux", overrides=overrides)
    from taylorseer_flux.sample import run_dir

    metrics = main(cfg)
    run = run_dir(cfg)
    assert run.parent == tmp_path / "flux" and "-N6-O1-W3-f8-12steps-32x32-" in run.name
    assert run.is_dir() and any(run.glob("*.png"))
    assert metrics["cache_bytes"] > 0 and metrics["run_config"]["cache"]["factor_store"] == "float8"


# ---------------------------------------------------------------------------------------------- digits
def test_digits_fidelity_of_8bit_factors():
    from taylorseer_eval.store_fidelity import STORES, digits_sampler, measure

    stores = [s for s in STORES if s.label in ("dense fp32", "float8 -> fp32")]
    rows = {(r["tag"], r["store"]): r for r in measure("digits", digits_sampler(100), "images", stores, False)}
    for order in (1, 2):
        dense, f8 = rows[(f"N4-O{order}-W2", "dense fp32")], rows[(f"N4-O{order}-W2-f8", "float8 -> fp32")]
        # measured: -0.13 dB (O=1), -0.16 dB (O=2) against the uncached samples; the store changes the
        # samples by far less than the cache does (~53 dB vs ~39 dB)
        assert dense["vs_uncached"] - 0.4 < f8["vs_uncached"] < dense["vs_uncached"]
        assert f8["vs_dense_fp32"] > dense["vs_uncached"] + 10
        assert f8["cache_bytes"] * 128 * 4 == dense["cache_bytes"] * (128 + 4)  # hidden 128
