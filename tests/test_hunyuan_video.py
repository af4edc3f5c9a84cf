"""TaylorSeer on diffusers' HunyuanVideoPipeline: a tiny random pipeline, saved and loaded like the real one.

Sizes: 32x32 pixels x 5 frames -> 2x4x4 latents -> 8 video tokens (patch 1x2x2) + 16 text tokens,
hidden 32 (2 heads x 16), 2 double + 2 single blocks.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from tiny_hunyuan import TRANSFORMER_CONFIG, save_tiny_pipeline

import taylorseer
from taylorseer import CacheConfig, count_flops
from taylorseer.harness.diffusers_io import WeightsNotFoundError
from taylorseer.perf.opcount import count_ops
from taylorseer_hunyuan_video import sample
from taylorseer_hunyuan_video.cache import attach_cache, cached_module_names
from taylorseer_hunyuan_video.flops import VideoShape, dummy_inputs, estimate_cache, meta_transformer
from taylorseer_hunyuan_video.pipeline import generate, load_hunyuan_video
from taylorseer_hunyuan_video.video_io import read_video, video_filename, video_filenames, write_mp4

H, W, F, TEXT = 32, 32, 5, 16
VIDEO_TOKENS = ((F - 1) // 4 + 1) * (H // 8 // 2) * (W // 8 // 2)  # 2 * 2 * 2 = 8
HIDDEN = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
N_BLOCKS = TRANSFORMER_CONFIG["num_layers"] + TRANSFORMER_CONFIG["num_single_layers"]
CALL = dict(height=H, width=W, num_frames=F, max_sequence_length=TEXT, guidance_scale=6.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_hunyuan"))


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    # The loader the sampling script uses (diffusers from_pretrained on the saved folder).
    return load_hunyuan_video(str(tiny_dir), dtype=torch.float32, flow_shift=7.0)


@pytest.fixture
def pipe(loaded):
    loaded.set_progress_bar_config(disable=True)
    yield loaded
    taylorseer.remove(loaded.transformer)


def latents(pipe, steps, prompt="a cat walks on the beach", seed=42, **kwargs):
    video = generate(pipe, prompt, seed, num_steps=steps, output_type="latent", **{**CALL, **kwargs})
    return video.frames, video.stats


# ------------------------------------------------------------------------------------------------ loading
def test_the_saved_pipeline_loads_back_with_the_flow_shift(tiny_dir, loaded):
    assert (tiny_dir / "model_index.json").is_file()
    assert type(loaded).__name__ == "HunyuanVideoPipeline"
    assert loaded.scheduler.config.shift == 7.0
    assert (loaded.vae_scale_factor_spatial, loaded.vae_scale_factor_temporal) == (8, 4)


def test_cached_modules_are_the_lean_forms_and_under_per_block_the_papers():
    model = meta_transformer(TRANSFORMER_CONFIG)
    assert cached_module_names(model) == [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff")] + [
        f"single_transformer_blocks.{i}.proj_out" for i in range(2)]  # no text forecast, no attention record
    assert cached_module_names(model, forecast_step="per_block") == [
        f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff", "ff_context")] + [
        f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "proj_out")]


@pytest.mark.parametrize("max_order", [1, 2])
def test_the_lean_default_gives_upstreams_video_to_float_rounding(pipe, max_order):
    """The default (lean: short double blocks, no text forecast, collapsed) against upstream's form
    (cache.forecast_step=per_block, the oracle), 50 steps N=5 fp32: measured max |diff| / max |latent| 9.2e-8
    (O=1) and 1.2e-7 (O=2); the lean cache holds the video tokens only, a third of upstream's here (8 video + 16 text
    tokens; 20.05 vs 20.31 GB at 480x640x65)."""
    reference, _ = latents(pipe, 50)
    results = {}
    for step in ("per_block", "collapsed"):
        attach_cache(pipe.transformer, CacheConfig(interval=5, max_order=max_order, first_enhance=1,
                                                   forecast_step=step), num_steps=50, single_attention=False)
        results[step] = latents(pipe, 50)
        taylorseer.remove(pipe.transformer)
    (upstream, upstream_stats), (lean, lean_stats) = results["per_block"], results["collapsed"]
    assert (upstream - reference).abs().max() > 1e-3 * reference.abs().max()  # forecasts happened
    assert 0 < (lean - upstream).abs().max() < 1e-6 * upstream.abs().max()  # float rounding, not the same ops
    assert lean_stats.cache_bytes * 3 == upstream_stats.cache_bytes


# ------------------------------------------------------------------------------------------- exactness
def test_interval_one_is_bit_identical_to_no_cache(pipe):
    reference, _ = latents(pipe, 6)
    attach_cache(pipe.transformer, CacheConfig(interval=1, max_order=2, first_enhance=1), num_steps=6)
    cached, stats = latents(pipe, 6)
    assert stats.full_steps() == {"cond": 6}
    assert torch.equal(cached, reference)


def test_schedule_is_10_of_50_at_n5_and_9_at_n6(pipe):
    attach_cache(pipe.transformer, CacheConfig(interval=5, max_order=1, first_enhance=1), num_steps=50)
    _, stats = latents(pipe, 50)
    assert [r.step for r in stats.history if r.full] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert len(stats.history) == 50 and {r.context for r in stats.history} == {"cond"}
    taylorseer.remove(pipe.transformer)
    attach_cache(pipe.transformer, CacheConfig(interval=6, max_order=1, first_enhance=1), num_steps=50)
    _, stats = latents(pipe, 50)
    assert stats.full_steps() == {"cond": 9}
    assert round(50 / 9, 2) == 5.56


def test_state_is_reset_between_calls(pipe):
    attach_cache(pipe.transformer, CacheConfig(interval=3, max_order=2, first_enhance=1), num_steps=10)
    first, _ = latents(pipe, 10)
    assert taylorseer.get_cache(pipe.transformer).nbytes() == 0  # diffusers reset it at the end of the call
    second, _ = latents(pipe, 10)
    other, _ = latents(pipe, 10, prompt="a red car at night", seed=7)
    third, _ = latents(pipe, 10)
    taylorseer.remove(pipe.transformer)
    attach_cache(pipe.transformer, CacheConfig(interval=3, max_order=2, first_enhance=1), num_steps=10)
    fresh, _ = latents(pipe, 10)
    assert torch.equal(first, second) and torch.equal(first, third) and torch.equal(first, fresh)
    assert not torch.equal(first, other)


def test_remove_restores_the_transformer(pipe):
    reference, _ = latents(pipe, 8)
    attach_cache(pipe.transformer, CacheConfig(interval=4, max_order=1, first_enhance=1), num_steps=8)
    cached, _ = latents(pipe, 8)
    assert not torch.equal(cached, reference)  # the cache really forecasts
    taylorseer.remove(pipe.transformer)
    model = pipe.transformer
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not model)
    # diffusers' HookRegistry (which relays cache_context) puts back the bound class forward on the root.
    assert "forward" not in model.__dict__ or model.forward.__func__ is type(model).forward
    assert not pipe.transformer._forward_pre_hooks
    assert torch.equal(latents(pipe, 8)[0], reference)


def test_offloaded_factors_give_the_same_video(pipe):
    attach_cache(pipe.transformer, CacheConfig(interval=4, max_order=1, first_enhance=1), num_steps=8)
    kept, kept_stats = latents(pipe, 8)
    taylorseer.remove(pipe.transformer)
    attach_cache(pipe.transformer, CacheConfig(interval=4, max_order=1, first_enhance=1, offload=True), num_steps=8)
    offloaded, stats = latents(pipe, 8)
    # offloaded factors are forecast block by block (the collapsed step covers factors on the device): the same
    # video to float rounding
    torch.testing.assert_close(offloaded, kept, rtol=0, atol=1e-6 * kept.abs().max().item())
    assert stats.cache_bytes == kept_stats.cache_bytes


def test_true_cfg_keeps_cond_and_uncond_apart(pipe):
    attach_cache(pipe.transformer, CacheConfig(interval=5, max_order=1, first_enhance=1), num_steps=10)
    _, single = latents(pipe, 10)
    _, both = latents(pipe, 10, true_cfg_scale=3.0, negative_prompt="blue")
    assert both.full_steps() == {"cond": 2, "uncond": 2}
    assert both.cache_bytes == 2 * single.cache_bytes


# ---------------------------------------------------------------------------------------- forecast steps
def _transformer_inputs(pipe):
    model = pipe.transformer
    inputs = dummy_inputs(model, VideoShape(H, W, F, TEXT), device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[key] = torch.randn(inputs[key].shape, generator=g)
    return inputs


def test_a_forecast_call_runs_no_attention_and_no_mlp(pipe):
    model = pipe.transformer
    inputs = _transformer_inputs(pipe)
    cache = attach_cache(model, CacheConfig(interval=5, max_order=1, first_enhance=1), num_steps=50)
    calls = []
    # Modules that only run when a branch is really computed (the cached ones themselves are still called).
    compute = [m for b in model.transformer_blocks for m in (b.attn.to_q, b.attn.add_q_proj, b.ff.net[2],
                                                             b.ff_context.net[2])]
    compute += [m for b in model.single_transformer_blocks for m in (b.attn.to_q, b.proj_mlp, b.proj_out)]
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in compute]
    try:
        with torch.no_grad():
            full_flops = count_flops(lambda: model(**inputs))  # step 0: full
            assert len(calls) == len(compute)
            calls.clear()
            forecast_flops = count_flops(lambda: model(**inputs))  # step 1: forecast
    finally:
        for h in handles:
            h.remove()
    assert [r.full for r in cache.history] == [True, False]
    assert calls == []
    # What still runs is exactly the embedders, the modulation linears and the final layer.
    assert forecast_flops < full_flops / 3


def test_single_block_forecast_is_residual_plus_gate_times_the_branch(pipe):
    model = pipe.transformer
    inputs = _transformer_inputs(pipe)
    block = model.single_transformer_blocks[1]
    seen = {}
    block.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    block.proj_out.register_forward_hook(lambda m, args, out: seen.update(branch=out.clone()))
    # upstream's form, block by block (O=0: reuse); the lean default collapses the blocks into one update
    attach_cache(model, CacheConfig(interval=5, max_order=0, first_enhance=1, forecast_step="per_block"),
                 num_steps=50)
    try:
        with torch.no_grad():
            model(**inputs)  # full: records the branch
            branch = seen.pop("branch")
            model(**{**inputs, "timestep": torch.tensor([300.0])})  # forecast, other conditioning
        assert "branch" not in seen  # proj_out did not run
        hidden, text, temb = seen["args"][:3]
        gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)[2].unsqueeze(1)
        expected = gate * branch + torch.cat([hidden, text], dim=1)
        video_out, text_out = seen["out"]
        assert video_out.shape == hidden.shape and text_out.shape == text.shape
        torch.testing.assert_close(torch.cat([video_out, text_out], dim=1), expected, rtol=0, atol=1e-6)
    finally:
        block._forward_hooks.clear()
        block.proj_out._forward_hooks.clear()


def test_order_zero_forecasts_do_not_change_the_stored_features(pipe):
    model = pipe.transformer
    inputs = _transformer_inputs(pipe)
    cache = attach_cache(model, CacheConfig(interval=4, max_order=0, first_enhance=1), num_steps=8)
    names = cached_module_names(model)
    with torch.no_grad():
        model(**inputs)
        stored = {n: [t.clone() for t in _as_tuple(cache.forecast(n))] for n in names}
        for _ in range(3):
            model(**inputs)
    assert [r.full for r in cache.history] == [True, False, False, False]
    for n in names:
        assert all(torch.equal(a, b) for a, b in zip(_as_tuple(cache.forecast(n)), stored[n], strict=True)), n


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# ------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("max_order,factor_dtype,itemsize", [(1, "auto", 4), (2, "bfloat16", 2)])
def test_cache_bytes_are_modules_times_orders_times_shape_times_itemsize(pipe, max_order, factor_dtype, itemsize):
    config = CacheConfig(interval=3, max_order=max_order, first_enhance=1, factor_dtype=factor_dtype)
    attach_cache(pipe.transformer, config, num_steps=12)
    _, stats = latents(pipe, 12)  # full steps 0, 3, 6, 9: every order is filled
    # The lean default: double = attn + ff (video tokens), single = its branch's video tokens.
    n_double, n_single = TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"]
    assert stats.cache_bytes == (max_order + 1) * (2 * n_double + n_single) * VIDEO_TOKENS * HIDDEN * itemsize
    taylorseer.remove(pipe.transformer)
    attach_cache(pipe.transformer, dataclasses.replace(config, forecast_step="per_block"), num_steps=12)
    _, stats = latents(pipe, 12)
    # Upstream's: double = attn (video + text) + ff (video) + ff_context (text); single = attn + branch, each
    # over all video + text tokens: 2 x (tokens x hidden) elements per block and per order.
    per_order = N_BLOCKS * 2 * (VIDEO_TOKENS + TEXT) * HIDDEN
    assert stats.cache_bytes == (max_order + 1) * per_order * itemsize


def test_without_the_single_attention_record_the_video_is_the_same_and_the_cache_a_third_smaller(pipe):
    config = CacheConfig(interval=3, max_order=1, first_enhance=1, forecast_step="per_block")  # upstream's form
    attach_cache(pipe.transformer, config, num_steps=12)
    paper, paper_stats = latents(pipe, 12)
    taylorseer.remove(pipe.transformer)
    attach_cache(pipe.transformer, config, num_steps=12, single_attention=False)
    lean, stats = latents(pipe, 12)
    assert torch.equal(lean, paper)
    n_double, n_single = TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"]
    assert stats.cache_bytes == 2 * (2 * n_double + n_single) * (VIDEO_TOKENS + TEXT) * HIDDEN * 4
    assert paper_stats.cache_bytes == 2 * (2 * n_double + 2 * n_single) * (VIDEO_TOKENS + TEXT) * HIDDEN * 4


def test_the_meta_estimate_matches_the_formula():
    est = estimate_cache(2, VideoShape(H, W, F, TEXT), "bfloat16", TRANSFORMER_CONFIG)
    # lean: double attn (video) + ff; single: the branch's video tokens
    assert est.num_modules == est.num_tensors == 2 * 2 + 2
    assert est.nbytes == est.formula_nbytes == 3 * (2 * 2 + 2) * VIDEO_TOKENS * HIDDEN * 2
    est = estimate_cache(2, VideoShape(H, W, F, TEXT), "bfloat16", TRANSFORMER_CONFIG, forecast_step="per_block")
    # double: attn (video, text) + ff + ff_context = 4 tensors; single: attn (video, text) + branch = 3
    assert est.num_modules == 3 * 2 + 2 * 2 and est.num_tensors == 4 * 2 + 3 * 2
    assert est.nbytes == est.formula_nbytes == 3 * N_BLOCKS * 2 * (VIDEO_TOKENS + TEXT) * HIDDEN * 2


# ------------------------------------------------------------------------------------------- video files
def test_mp4_has_the_requested_frames_and_size(pipe, tmp_path):
    video = generate(pipe, "a dog runs on the street", 42, num_steps=4, **CALL)
    assert video.frames.shape == (F, H, W, 3)
    path = write_mp4(tmp_path / video_filename("a dog runs on the street", 0), video.frames, fps=24)
    assert path.name == "a dog runs on the street-0.mp4"
    frames = read_video(path)
    assert frames.shape == (F, H, W, 3) and frames.dtype.name == "uint8"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_vbench_file_names():
    # VBench looks videos up as "{prompt}-{index}.mp4": prompts that are valid file names stay verbatim.
    assert video_filename("A cat walks on the grass, realistic style.", 4) == (
        "A cat walks on the grass, realistic style.-4.mp4")
    assert video_filename("ok.", 0) == "ok.-0.mp4" and video_filename("ümlaut, 3 cats", 1) == "ümlaut, 3 cats-1.mp4"
    # Others are cleaned and tagged with their text's hash: never two prompts in one file.
    assert video_filename("left/right", 0) == "left_right~9fe534ec-0.mp4"
    for odd in ("a\nb", "cat ", " cat", ".hidden", "tab\there", "a\\b", "é" * 300):
        name = video_filename(odd, 12)
        assert "/" not in name and "\n" not in name and "\t" not in name and not name.startswith(".")
        assert len(name.encode()) <= 255 and name.endswith("-12.mp4") and "~" in name
    names = video_filenames(["a/b cat", "a_b cat", "cat", "cat ", "A dog", "a dog", "x" * 300, "x" * 301], 5)
    assert len(set(names.values())) == 8 * 5  # every (prompt, index) has its own file
    assert len({n.casefold() for n in names.values()}) == 8 * 5  # also on a case-insensitive file system
    assert names[("a_b cat", 0)] == "a_b cat-0.mp4" and names[("cat", 2)] == "cat-2.mp4"
    assert all(len(n.encode()) <= 255 for n in names.values())


# ------------------------------------------------------------------------------------------- the app
def _cli(monkeypatch, *overrides):
    monkeypatch.setattr(sys, "argv", ["sample", *overrides])
    sample.cli()


def test_hydra_app_writes_videos_and_metrics_and_resumes(monkeypatch, tiny_dir, tmp_path, capsys):
    args = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
            f"max_sequence_length={TEXT}", "num_steps=10", "videos_per_prompt=2", "progress=false", "warmup=false",
            "prompt=[a cat walks,a dog runs]"]
    _cli(monkeypatch, *args)
    run = next((tmp_path / "hunyuan_video").glob("N5-O1-W1-10steps-32x32x5-*"))
    assert sorted(p.name for p in run.glob("*.mp4")) == ["a cat walks-0.mp4", "a cat walks-1.mp4",
                                                        "a dog runs-0.mp4", "a dog runs-1.mp4"]
    assert read_video(run / "a dog runs-1.mp4").shape == (F, H, W, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == 4 and metrics["full_steps"] == 2 and metrics["schedule_compression"] == 5.0
    # default, the lean form: the video tokens of a double block's attn and ff and of a single block's branch
    n_double, n_single = TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"]
    assert metrics["cache_bytes"] == 2 * (2 * n_double + n_single) * VIDEO_TOKENS * HIDDEN * 4
    assert metrics["cached_modules"] == 2 * n_double + n_single and metrics["flops_total"] < metrics["flops_uncached"]
    assert [(r["prompt"], r["seed"]) for r in metrics["items"]] == [("a cat walks", 42), ("a cat walks", 43),
                                                                   ("a dog runs", 42), ("a dog runs", 43)]
    assert (run / "config.yaml").is_file()
    capsys.readouterr()
    _cli(monkeypatch, *args)  # everything is there: nothing is sampled again
    assert "all 4 videos are already in" in capsys.readouterr().out
    again = json.loads((run / "metrics.json").read_text())  # the sampling run's measured figures are kept
    assert all(again[k] == metrics[k] for k in ("peak_memory_bytes", "cache_bytes_per_rank", "world_size")), again
    (run / "a cat walks-1.mp4").unlink()  # a preempted run: only the missing video is made again
    _cli(monkeypatch, *args)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == 4 and (run / "a cat walks-1.mp4").is_file()


def test_upstreams_form_is_one_setting_away_in_the_app(monkeypatch, tiny_dir, tmp_path):
    """cache.forecast_step=per_block (+ record_single_attention=true: upstream's memory) caches upstream's modules."""
    _cli(monkeypatch, f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
         f"max_sequence_length={TEXT}", "num_steps=10", "videos_per_prompt=1", "progress=false", "warmup=false",
         "cache.forecast_step=per_block", "record_single_attention=true", "run_name=upstream")
    metrics = json.loads((tmp_path / "hunyuan_video" / "upstream" / "metrics.json").read_text())
    n_double, n_single = TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"]
    assert metrics["cached_modules"] == 3 * n_double + 2 * n_single
    assert metrics["cache_bytes"] == 2 * N_BLOCKS * 2 * (VIDEO_TOKENS + TEXT) * HIDDEN * 4


def test_metrics_stay_true_after_a_kill_and_cover_every_video(monkeypatch, tiny_dir, tmp_path, capsys):
    args = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
            f"max_sequence_length={TEXT}", "num_steps=4", "videos_per_prompt=2", "progress=false", "warmup=false",
            "prompt=[a cat walks,a dog runs]", "run_name=killed"]
    run = tmp_path / "hunyuan_video" / "killed"
    written = []

    def dies_on_the_third(path, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt  # the job is killed while the third video is being written
        written.append(path)
        return write_mp4(path, *a, **k)

    monkeypatch.setattr(sample, "write_mp4", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _cli(monkeypatch, *args)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == 2 and not metrics["complete"]  # what is in the folder, no more, no less
    assert sorted(r["file"] for r in metrics["items"]) == ["a cat walks-0.mp4", "a cat walks-1.mp4"]
    monkeypatch.setattr(sample, "write_mp4", write_mp4)
    _cli(monkeypatch, *args)  # the resumed run reports every video of the folder, not only its own two
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == 4 and metrics["complete"]
    (run / "metrics.json").unlink()
    _cli(monkeypatch, *args)  # every video there: the metrics are still written
    assert json.loads((run / "metrics.json").read_text())["num_items"] == 4
    # The same run_name with another size or step count is refused, not answered with the old videos.
    capsys.readouterr()
    for changed, key in (("num_steps=5", "num_steps"), (f"height={2 * H}", "height")):
        with pytest.raises(SystemExit):
            _cli(monkeypatch, *args, changed)
        err = capsys.readouterr().err.strip()
        assert f"holds outputs made with other settings ({key}:" in err and len(err.splitlines()) == 1


def test_cache_offload_runs_through_the_app(monkeypatch, tiny_dir, tmp_path):
    # It used to crash after sampling (the meta-device FLOPs count reached the offload copy), before metrics.
    args = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
            f"max_sequence_length={TEXT}", "num_steps=6", "videos_per_prompt=1", "progress=false", "warmup=false",
            "cache.offload=true", "run_name=offload"]
    _cli(monkeypatch, *args)
    metrics = json.loads((tmp_path / "hunyuan_video" / "offload" / "metrics.json").read_text())
    assert metrics["num_items"] == 1 and metrics["compression"] > 1 and metrics["cache_bytes"] > 0
    assert metrics["cache_location"] == "pinned CPU memory"


def test_odd_prompts_get_their_own_writable_files(monkeypatch, tiny_dir, tmp_path):
    prompts = ["a/b cat", "a_b cat", "cat ", "cat", "long " + "é" * 200, "two\nlines"]
    (tmp_path / "p.txt").write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")  # file: one per line
    args = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
            f"max_sequence_length={TEXT}", "num_steps=2", "videos_per_prompt=1", "progress=false", "warmup=false",
            "run_name=odd"]
    monkeypatch.setattr(sample, "read_prompts", lambda *a: prompts)  # as a list from Python: newline kept
    _cli(monkeypatch, *args)
    run = tmp_path / "hunyuan_video" / "odd"
    files = sorted(p.name for p in run.glob("*.mp4"))
    assert len(files) == 6 and "a_b cat-0.mp4" in files and "cat-0.mp4" in files
    mapping = json.loads((run / "prompts.json").read_text())
    assert sorted(mapping.values()) == sorted(prompts) and sorted(mapping) == files
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("overrides,message", [
    (["cache.interval=0"], "cache.interval=0 is invalid"),
    (["+cache.nope=1"], "unknown cache option(s) ['nope']"),
    (["+nope=1"], "unknown setting(s) ['nope']"),
    (["num_steps=abc"], "num_steps='abc' is invalid: expected an integer >= 1"),
    (["vae_tiling=no"], "vae_tiling='no' is invalid: expected true or false"),
    (["num_frames=64"], "num_frames=64 is invalid: expected 4k+1"),
    (["height=100"], "height=100 is invalid"),
    (["prompt=null"], "no prompt given"),
    (["prompt_file=/does/not/exist.txt"], "does not exist"),
    (["cpu_offload=true", "device=cpu"], "cpu_offload=true needs a CUDA device"),
    (["record_single_attention=true"], "records no attention: add cache.forecast_step=per_block for upstream's"),
])
def test_bad_settings_fail_before_loading_with_one_clear_line(monkeypatch, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        _cli(monkeypatch, f"model.path={tmp_path / 'missing'}", f"out_root={tmp_path}", *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_model_config_of_another_app_names_the_ones_that_fit(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(monkeypatch, "model=digits", f"out_root={tmp_path}")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "is a dit model config (model.family='dit'); sample_hunyuan_video takes family 'hunyuan_video': " \
           "model=hunyuan_video" in err


def test_missing_weights_say_where_and_how(monkeypatch, tmp_path, capsys):
    with pytest.raises(WeightsNotFoundError, match="huggingface-cli download"):
        load_hunyuan_video(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        _cli(monkeypatch, f"model.path={tmp_path / 'nowhere'}", f"out_root={tmp_path}", "progress=false")
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "model_index.json" in err


def test_an_unknown_key_without_plus_is_refused_by_hydra(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "nope=1")
    assert "+nope=1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- FLOPs
def _block_flops(tokens: int, hidden: int, mlp_ratio: float = 4.0) -> int:
    """What a forecast step skips in one block (double or single: the same), FlopCounterMode convention.

    QKV 6 t h^2 + output projection(s) 2 t h^2 + attention 4 t^2 h + MLP 4 r t h^2.
    """
    return int(8 * tokens * hidden**2 + 4 * tokens**2 * hidden + 4 * mlp_ratio * tokens * hidden**2)


def test_full_size_transformer_flops_on_the_meta_device():
    # The real 13B architecture on shapes only; 5 frames instead of 65 keeps it a few seconds.
    shape = VideoShape(480, 640, 5)
    model = meta_transformer()
    inputs = dummy_inputs(model, shape)
    cache = attach_cache(model, CacheConfig(interval=5, max_order=1, first_enhance=1), num_steps=50)
    with torch.no_grad():
        report = taylorseer.count_schedule(lambda: model(**inputs), cache, 50)
    tokens = shape.video_tokens(2, 1) + 256
    assert shape.latent == (2, 60, 80) and tokens == 2400 + 256
    # a forecast step also skips the shift/scale rows of the 40 single blocks' modulation (3072 -> 2 x 3072) and, in
    # the lean form, all but the two gate rows of the 20 double blocks' video modulation (3072 -> 4 x 3072) and
    # their whole text modulation (3072 -> 6 x 3072)
    skipped_modulation = (40 * 2 + 20 * (4 + 6)) * 3072 * 2 * 3072
    assert report.full_step_flops - report.forecast_step_flops == 60 * _block_flops(tokens, 3072) + skipped_modulation
    assert report.forecast_step_flops < 5e-3 * report.full_step_flops  # embedders, modulation, final layer
    assert report.full_steps == 10 and 4.9 < report.compression < 5.0


def test_full_size_forecast_step_kernels_lean_and_upstream():
    """The app's default form (lean, collapsed) against upstream's (per_block): kernels of one forecast step of the
    full-size transformer (meta device; they do not depend on the frame count), as eval/forecast_kernels counts."""
    model = meta_transformer()
    inputs = dummy_inputs(model, VideoShape(480, 640, 5))
    kernels = {}
    for step in ("collapsed", "per_block"):
        attach_cache(model, CacheConfig(interval=5, max_order=1, first_enhance=1, forecast_step=step), num_steps=50)
        with torch.no_grad():
            for _ in range(6):  # full steps 0 and 5
                model(**inputs)
            kernels[step] = count_ops(lambda: model(**inputs)).kernels
        taylorseer.remove(model)
    assert kernels == {"collapsed": 190, "per_block": 1142}


@pytest.mark.slow
def test_full_size_flops_and_cache_at_480x640x65():
    from taylorseer_hunyuan_video.flops import count_run_flops

    shape = VideoShape()  # 480x640, 65 frames: 17x60x80 latents, 20,400 video + 256 text tokens
    report = count_run_flops(CacheConfig(interval=5, max_order=1, first_enhance=1), shape, 50)
    assert shape.video_tokens(2, 1) == 20400
    skipped_modulation = (40 * 2 + 20 * (4 + 6)) * 3072 * 2 * 3072  # modulation rows a forecast step skips (above)
    assert report.full_step_flops - report.forecast_step_flops == 60 * _block_flops(20656, 3072) + skipped_modulation
    assert report.full_step_flops / 1e12 == pytest.approx(595.43, abs=0.01)
    assert report.flops_uncached / 1e12 == pytest.approx(29771.4, abs=0.1)
    assert report.full_steps == 10 and report.compression == pytest.approx(4.995, abs=1e-3)
    for order, expected in ((1, 20_054_016_000), (2, 30_081_024_000)):  # lean: video tokens, 20 x 2 + 40 x 1
        est = estimate_cache(order, shape)
        assert est.nbytes == est.formula_nbytes == expected == (order + 1) * (20 * 2 + 40) * 20400 * 3072 * 2
    for order, expected in ((1, 30_458_511_360), (2, 45_687_767_040)):  # upstream's modules (the paper's)
        est = estimate_cache(order, shape, forecast_step="per_block")
        assert est.nbytes == est.formula_nbytes == expected == (order + 1) * 60 * 2 * 20656 * 3072 * 2
    upstream = estimate_cache(1, shape, single_attention=False, forecast_step="per_block")  # 20 x 2 + 40 x 1 units
    assert upstream.nbytes == 2 * (20 * 2 + 40) * 20656 * 3072 * 2 == 20_305_674_240


def test_diffusers_hook_baseline_runs_in_the_same_app(monkeypatch, tiny_dir, tmp_path):
    args = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
            f"max_sequence_length={TEXT}", "num_steps=10", "videos_per_prompt=1", "progress=false", "warmup=false",
            "cache_impl=diffusers"]
    _cli(monkeypatch, *args)
    run = next((tmp_path / "hunyuan_video").glob("N5-O1-W1-diffusers-10steps-32x32x5-*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["full_steps"] == 3 and metrics["cached_modules"] == 0  # steps 0, 2, 7: diffusers' own rule
    assert 1 < metrics["compression"] < 10 / 3


def test_calibrate_app_writes_a_file_the_sampler_reads(monkeypatch, tiny_dir, tmp_path):
    from taylorseer_hunyuan_video import calibrate as calibrate_app

    common = [f"model.path={tiny_dir}", f"out_root={tmp_path}", f"height={H}", f"width={W}", f"num_frames={F}",
              f"max_sequence_length={TEXT}", "num_steps=6", "progress=false", "prompt=[a cat walks,a dog runs]"]
    monkeypatch.setattr(sys, "argv", ["calibrate", *common, "samples=6", "sketch_size=64"])
    calibrate_app.cli()
    path = tmp_path / "calibrations" / f"hunyuan_video-6steps-{H}x{W}x{F}-seed1.json"
    data = json.loads(path.read_text())
    n_double, n_single = TRANSFORMER_CONFIG["num_layers"], TRANSFORMER_CONFIG["num_single_layers"]
    assert data["num_steps"] == 6 and data["samples"] == 6 and data["modules"] == 2 * n_double + n_single  # lean
    assert data["settings"]["app"] == "hunyuan_video" and len(data["sensitivity"]) == 6
    assert data["flops"]["per_run"] > 0
    # what the file was made for, as the FLUX and DiT files record it (matched by every app that reads it)
    made_for = data["made_for"]
    assert made_for["app"] == "hunyuan_video" and made_for["weights"] and not made_for["weights"].startswith("hub:")
    monkeypatch.setattr(sys, "argv", ["sample", *common, "videos_per_prompt=1", "warmup=false",
                                      "cache.schedule=calibrated", "cache.budget=3", f"cache.calibration={path}"])
    sample.cli()
    run = next((tmp_path / "hunyuan_video").glob("*-6steps-*"))
    assert json.loads((run / "metrics.json").read_text())["full_steps"] == 3
