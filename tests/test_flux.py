"""TaylorSeer-FLUX on a tiny FluxPipeline saved to disk and loaded through sample_flux.sh's code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import taylorseer  # noqa: E402
from taylorseer import CacheConfig  # noqa: E402
from taylorseer.harness.diffusers_io import WeightsNotFoundError  # noqa: E402
from taylorseer_flux.cache import attach_cache, cached_module_names  # noqa: E402
from taylorseer_flux.flops import count_run_flops, transformer_inputs  # noqa: E402
from taylorseer_flux.pipeline import generate, load_flux  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_flux import IMAGE_SIZE, TEXT_TOKENS, TINY_TRANSFORMER, save_tiny_flux  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = CacheConfig(interval=6, max_order=1, first_enhance=3)
STEPS = 50
CALL = dict(num_steps=STEPS, height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=TEXT_TOKENS, output_type="pt")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    # The loader sample_flux.sh uses for black-forest-labs/FLUX.1-dev, pointed at the saved folder.
    return load_flux(str(tiny_dir), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def uncached(pipe):
    return generate(pipe, ["a photo of the cat"], [0], **CALL).images[0]


@pytest.fixture
def cached(pipe):
    """Attach the cache for one test; always detached afterwards."""
    attached = []

    def attach(config=PAPER, **kwargs):
        attached.append(attach_cache(pipe.transformer, config, STEPS, **kwargs))
        return attached[-1]

    yield attach
    taylorseer.remove(pipe.transformer)


def test_interval_1_is_bit_identical(pipe, uncached, cached):
    cached(CacheConfig(interval=1, max_order=1, first_enhance=3))
    out = generate(pipe, ["a photo of the cat"], [0], **CALL)
    assert out.full_steps == {"cond": STEPS}
    assert torch.equal(out.images[0], uncached)


def test_paper_schedule_computes_10_of_50_steps(pipe, uncached, cached):
    cache = cached()
    out = generate(pipe, ["a photo of the cat"], [0], **CALL)
    full = [r.step for r in out.history if r.full]
    assert full == [0, 1, 2] + list(range(8, 50, 6))
    assert out.full_steps == {"cond": 10} and len(out.history) == STEPS
    assert out.cache_bytes > 0 and cache.nbytes() == 0  # diffusers' end-of-call reset reached the cache
    diff = (out.images[0] - uncached).abs().max().item()
    assert 0 < diff < 0.05  # forecasts happened, and stay close on a smooth random model


def test_forecast_steps_run_no_attention(pipe, cached):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    calls = []
    attentions = [m for m in pipe.transformer.modules() if isinstance(m, FluxAttention)]
    originals = [m.processor for m in attentions]

    def counting(processor):
        def run(*args, **kwargs):
            calls.append(1)
            return processor(*args, **kwargs)

        return run

    cached()
    try:
        for m in attentions:
            m.processor = counting(m.processor)  # plain attribute: set_processor would check the class
        generate(pipe, ["a photo of the cat"], [0], **CALL)
    finally:
        for m, p in zip(attentions, originals, strict=True):
            m.processor = p
    assert len(attentions) == 4 and len(calls) == 10 * 4  # only the 10 full steps run attention


def _linear_flops(model, tokens: dict[str, int]) -> int:
    """2 x multiply-adds of the Linear layers a forecast call still runs, by hand."""
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        rows = next((n for prefix, n in tokens.items() if name.startswith(prefix)), None)
        if name.startswith(("time_text_embed.", "norm_out.")):
            rows = 1  # per-image vectors: timestep/guidance/pooled-text embedders, final modulation
        if rows is not None:
            total += 2 * rows * module.in_features * module.out_features
        elif name.endswith(".norm1.linear"):  # double block: the attention and MLP gates, 2 of 6 chunks
            total += 2 * module.in_features * module.out_features * 2 // 6
        elif name.endswith(".norm.linear"):  # single block: the gate, 1 of 3 chunks
            total += 2 * module.in_features * module.out_features // 3
    return total


def test_forecast_call_flops_are_embedders_gates_and_final_layer_only():
    from diffusers import FluxTransformer2DModel

    image_tokens, text_tokens = 64, TEXT_TOKENS
    report = count_run_flops(TINY_TRANSFORMER, PAPER, STEPS, num_image_tokens=image_tokens, text_tokens=text_tokens)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**TINY_TRANSFORMER)
    expected = _linear_flops(model, {"x_embedder": image_tokens, "context_embedder": text_tokens,
                                     "proj_out": image_tokens})
    assert report.forecast_step_flops == expected
    assert report.full_step_flops > 20 * expected
    assert report.full_steps == 10 and report.flops_total < report.flops_uncached / 4


def test_two_calls_in_a_row_are_identical(pipe, cached):
    cached()
    first = generate(pipe, ["a photo of the cat"], [0], **CALL).images[0]
    second = generate(pipe, ["a photo of the cat"], [0], **CALL).images[0]
    assert torch.equal(first, second)


def test_batch_of_2_equals_two_runs_of_1(pipe, cached):
    cached(CacheConfig(interval=6, max_order=2, first_enhance=3))
    both = generate(pipe, ["a photo of the cat", "a dog"], [0, 1], **CALL)
    one = generate(pipe, ["a photo of the cat"], [0], **CALL).images[0]
    two = generate(pipe, ["a dog"], [1], **CALL).images[0]
    assert both.full_steps == {"cond": 10}
    assert not torch.allclose(one, two, atol=1e-2)  # different prompts and seeds: a real check
    torch.testing.assert_close(both.images[0], one, rtol=0, atol=1e-5)
    torch.testing.assert_close(both.images[1], two, rtol=0, atol=1e-5)


def test_remove_restores_the_model(pipe, uncached):
    from diffusers.hooks import HookRegistry

    transformer = pipe.transformer
    attach_cache(transformer, PAPER, STEPS)
    assert generate(pipe, ["a photo of the cat"], [0], **CALL).full_steps == {"cond": 10}
    taylorseer.remove(transformer)
    assert taylorseer.get_cache(transformer) is None
    assert not transformer._forward_pre_hooks
    assert all("forward" not in m.__dict__ for m in transformer.modules() if m is not transformer)
    # diffusers' HookRegistry leaves the root's forward as an instance attribute: the class's, bound.
    assert transformer.forward.__func__ is type(transformer).forward
    assert "taylorseer_context_relay" not in HookRegistry.check_if_exists_or_initialize(transformer).hooks
    assert torch.equal(generate(pipe, ["a photo of the cat"], [0], **CALL).images[0], uncached)


def test_true_cfg_keeps_cond_and_uncond_apart(pipe, cached):
    cfg_call = dict(CALL, true_cfg_scale=2.0, negative_prompt="blurry")
    reference = generate(pipe, ["a photo of the cat"], [0], **cfg_call).images[0]
    cached(CacheConfig(interval=1))
    exact = generate(pipe, ["a photo of the cat"], [0], **cfg_call)
    assert torch.equal(exact.images[0], reference)
    taylorseer.remove(pipe.transformer)

    cached()
    out = generate(pipe, ["a photo of the cat"], [0], **cfg_call)
    assert [r.context for r in out.history] == ["cond", "uncond"] * STEPS
    for context in ("cond", "uncond"):
        records = [r for r in out.history if r.context == context]
        assert [r.step for r in records] == list(range(STEPS))  # each branch has its own step counter
        assert [r.step for r in records if r.full] == [0, 1, 2] + list(range(8, 50, 6))
    assert 0 < (out.images[0] - reference).abs().max().item() < 0.05


def _euler(transformer, inputs: dict, steps: int = STEPS) -> torch.Tensor:
    x = inputs["hidden_states"].clone()
    for i in range(steps):
        t = torch.full((x.shape[0],), 1 - i / steps)
        with torch.no_grad():
            v = transformer(**{**inputs, "hidden_states": x, "timestep": t})[0]
        x = x - v / steps
    return x


@pytest.mark.parametrize("order", [0, 1, 2])
def test_short_forecast_forwards_equal_plain_cached_modules(order):
    """The block overrides only skip work whose results are unused and fuse the rest: same output."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER).eval()
    torch.manual_seed(1)
    inputs = transformer_inputs(TINY_TRANSFORMER, 64, TEXT_TOKENS, batch=2, device="cpu")
    config = CacheConfig(interval=6, max_order=order, first_enhance=3)
    uncached = _euler(model, inputs)
    # Reference: every cached feature a plain cached module (the single blocks' proj_out included).
    names = cached_module_names(model, forecast_text=True)  # every module of the blocks' branches
    assert names == [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff", "ff_context")] + [
        f"single_transformer_blocks.{i}.proj_out" for i in range(len(model.single_transformer_blocks))]
    taylorseer.apply(model, config, modules=names, num_steps=STEPS)
    plain = _euler(model, inputs)
    taylorseer.remove(model)
    outs = {}
    for key, kwargs in {"short": {}, "text": {"forecast_text": True}, "long double": {"short_double": False}}.items():
        cache = attach_cache(model, config, STEPS, **kwargs)
        outs[key] = _euler(model, inputs)
        assert cache.full_step_count == 10
        taylorseer.remove(model)
    # Forecasting the text tokens changes no image token: bit for bit.
    assert torch.equal(outs["short"], outs["text"])
    forecast_error = (plain - uncached).abs().max().item()
    assert forecast_error > 1e-4  # the comparison below is far tighter than the forecasts' own error
    for key, out in outs.items():
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5, msg=key)


def test_schnell_architecture_without_guidance_embedder():
    """FLUX.1-schnell's transformer has no guidance embedder: the cache is the same."""
    from diffusers import FluxTransformer2DModel

    config = {**TINY_TRANSFORMER, "guidance_embeds": False}
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    inputs = transformer_inputs(config, 64, TEXT_TOKENS, device="cpu")
    assert "guidance" not in inputs
    reference = _euler(model, inputs, steps=4)
    cache = attach_cache(model, CacheConfig(interval=1), 4)
    assert torch.equal(_euler(model, inputs, steps=4), reference)
    taylorseer.remove(model)
    cache = attach_cache(model, PAPER, 4)  # schnell's 4 steps: 0-2 computed, 3 forecast
    out = _euler(model, inputs, steps=4)
    assert [r.full for r in cache.history] == [True, True, True, False]
    taylorseer.remove(model)
    assert 0 < (out - reference).abs().max().item() < 0.05


def test_kontext_pipeline_from_the_same_folder(tiny_dir):
    import numpy as np
    from PIL import Image

    kontext = load_flux(str(tiny_dir), pipeline="FluxKontextPipeline")
    image = Image.fromarray((np.random.RandomState(0).rand(IMAGE_SIZE, IMAGE_SIZE, 3) * 255).astype(np.uint8))
    # _auto_resize=False keeps the input at 32x32 (Kontext would scale it to ~1024^2 otherwise).
    call = dict(CALL, num_steps=20, image=image, _auto_resize=False)
    reference = generate(kontext, ["make it red"], [0], **call).images[0]
    attach_cache(kontext.transformer, CacheConfig(interval=1), 20)
    try:
        assert torch.equal(generate(kontext, ["make it red"], [0], **call).images[0], reference)
    finally:
        taylorseer.remove(kontext.transformer)
    attach_cache(kontext.transformer, PAPER, 20)
    try:
        out = generate(kontext, ["make it red"], [0], **call)
    finally:
        taylorseer.remove(kontext.transformer)
    assert out.full_steps == {"default": 5}  # 0, 1, 2, 8, 14; Kontext names no cache context
    assert 0 < (out.images[0] - reference).abs().max().item() < 0.05


def test_flux_dev_flops_on_meta_match_the_published_count():
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER

    report = count_run_flops(FLUX_DEV_TRANSFORMER, PAPER, STEPS, height=1024, width=1024, text_tokens=512)
    assert report.full_step_flops / 1e12 == pytest.approx(74.38, abs=0.01)
    assert report.flops_uncached / 1e12 == pytest.approx(3726.87, rel=0.01)
    assert report.full_steps == 10
    assert report.compression == pytest.approx(4.99, abs=0.01)


# ------------------------------------------------------------------------------------------- the Hydra app
def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="sample_flux", overrides=overrides)


def _app_overrides(tiny_dir, out_root, *extra) -> list[str]:
    return [f"model.path={tiny_dir}", f"out_root={out_root}", f"height={IMAGE_SIZE}", f"width={IMAGE_SIZE}",
            f"max_sequence_length={TEXT_TOKENS}", "progress=false", "device=cpu", *extra]


def test_sample_app_end_to_end_and_resume(tiny_dir, tmp_path):
    from taylorseer_flux.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na photo of the cat\n\na dog on a skateboard\n")
    out_root = tmp_path / "runs"
    cfg = _compose(_app_overrides(tiny_dir, out_root, f"prompt_file={prompts}", "num_images_per_prompt=2",
                                  "batch_size=3", "compare_uncached=true", "warmup=false"))
    metrics = main(cfg)
    run = next((out_root / "flux").glob("flux-dev-N6-O1-W3-50steps-32x32-seed0-*"))
    names = ["00000-a_photo_of_the_cat.png", "00001-a_photo_of_the_cat.png",
             "00002-a_dog_on_a_skateboard.png", "00003-a_dog_on_a_skateboard.png"]
    assert sorted(p.name for p in run.glob("*.png")) == names
    assert sorted(p.name for p in (run / "uncached").glob("*.png")) == names
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["num_items"] == 4 and on_disk["full_steps"] == 10 and on_disk["num_steps"] == 50
    assert [r["seed"] for r in on_disk["items"]] == [0, 1, 2, 3]
    assert on_disk["flops_uncached"] > on_disk["flops_total"] > 0 and on_disk["compression"] > 4
    assert on_disk["cache_bytes"] > 0 and on_disk["peak_memory_bytes"] > 0 and on_disk["latency_s"] > 0
    assert on_disk["wall_speedup"] > 0 and 30 < on_disk["psnr_vs_uncached"] <= 100
    assert on_disk["ssim_vs_uncached"] > 0.9
    assert on_disk["run_config"]["cache"]["interval"] == 6 and on_disk["run_config"]["model"]["path"] == str(tiny_dir)
    assert metrics["num_items"] == 4 and (run / "config.yaml").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*.png")}
    again = main(cfg)  # resume: nothing left to do
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.png")} == mtimes
    assert again["num_items"] == 4 and again["latency_s"] == pytest.approx(on_disk["latency_s"])

    with pytest.raises(ValueError, match="other settings.*guidance_scale"):
        main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={prompts}", "guidance_scale=2.0")))


def test_sample_app_clear_errors_write_nothing(tiny_dir, tmp_path):
    from hydra.errors import ConfigCompositionException

    from taylorseer_flux.sample import main

    out_root = tmp_path / "runs"
    with pytest.raises(WeightsNotFoundError, match="no diffusers pipeline at .*missing.*huggingface-cli download"):
        main(_compose(_app_overrides(tmp_path / "missing", out_root)))
    with pytest.raises(ValueError, match=r"cache\.interval=0 is invalid"):
        main(_compose(_app_overrides(tiny_dir, out_root, "cache.interval=0")))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={empty}")))
    with pytest.raises(ValueError, match="multiple of 16"):
        main(_compose(_app_overrides(tiny_dir, out_root, "height=40")))
    with pytest.raises(ConfigCompositionException):
        _compose(_app_overrides(tiny_dir, out_root, "cache.intervall=3"))
    assert not out_root.exists()


def test_sample_script_reports_one_line_error(tmp_path):
    env = {**os.environ, "TAYLORSEER_VENV": os.environ.get("VIRTUAL_ENV", str(ROOT / ".venv")), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "sample_flux.sh"), "cache.interval=0",
                             f"out_root={tmp_path / 'runs'}"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "[sample_flux] error: cache.interval=0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_a_run_folder_never_reports_other_settings(tiny_dir, tmp_path):
    from taylorseer_flux.sample import main

    out_root = tmp_path / "runs"
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("a photo of the cat\n")
    second.write_text("a dog on a skateboard\n")
    base = ["warmup=false", "num_steps=8"]
    main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={first}", *base)))
    # Another prompt file: its own default folder (named after the prompts), never the old image.
    main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={second}", *base)))
    folders = sorted(p.name for p in (out_root / "flux").iterdir())
    assert len(folders) == 2 and folders[0].startswith("flux-dev-N6-O1-W3-8steps-32x32-seed0-first-")
    # Into one named folder, other prompts are refused, the old image is not kept as the new one.
    main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={first}", "run_name=same", *base)))
    with pytest.raises(ValueError, match=r"other settings \(resolved.prompts: .*run_name=<new name>"):
        main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={second}", "run_name=same", *base)))
    # The same prompts under another file name are the same run: nothing to redo.
    copy = tmp_path / "copy.txt"
    copy.write_text(first.read_text())
    again = main(_compose(_app_overrides(tiny_dir, out_root, f"prompt_file={copy}", "run_name=same", *base)))
    assert again["num_items"] == 1
    # With run_name, a new size or step count is refused too.
    named = [f"prompt_file={first}", "run_name=mine", "warmup=false"]
    main(_compose(_app_overrides(tiny_dir, out_root, *named, "num_steps=8")))
    for changed, key in (("num_steps=9", "num_steps"), ("height=48", "height"), ("dtype=bfloat16", "resolved.dtype"),
                         ("cache.max_order=2", "cache.max_order"), ("seed=3", "seed")):
        with pytest.raises(ValueError, match=rf"other settings \({key}:"):
            main(_compose(_app_overrides(tiny_dir, out_root, *named, "num_steps=8", changed)))
    # Settings that cannot change an image are free: batch size, progress, warm-up.
    main(_compose(_app_overrides(tiny_dir, out_root, *named, "num_steps=8", "batch_size=4", "progress=true")))


def test_a_folder_of_another_pipeline_fails_in_one_line_and_blocks_nothing(tiny_dir, tmp_path):
    from tiny_hunyuan import save_tiny_pipeline

    from taylorseer_flux.sample import main

    video_dir = save_tiny_pipeline(tmp_path / "hv")
    out_root = tmp_path / "runs"
    with pytest.raises(WeightsNotFoundError, match="holds a HunyuanVideoPipeline but this app loads a FluxPipeline"):
        main(_compose(_app_overrides(video_dir, out_root, "warmup=false", "num_steps=4")))
    # The corrected rerun into the same folder is not blocked by anything the failed one left.
    assert main(_compose(_app_overrides(tiny_dir, out_root, "warmup=false", "num_steps=4")))["num_items"] == 1


@pytest.mark.parametrize("override,message", [
    ("num_steps=abc", "num_steps='abc' is invalid: expected an integer >= 1"),
    ("compare_uncached=no", "compare_uncached='no' is invalid: expected true or false"),
    ("+num_stpes=10", "unknown setting(s) ['num_stpes']"),
    ("batch_size=1.5", "batch_size=1.5 is invalid: expected an integer >= 1"),
])
def test_settings_of_the_wrong_type_fail_in_one_line(tmp_path, override, message):
    from taylorseer_flux.sample import main

    with pytest.raises(ValueError) as info:
        main(_compose(_app_overrides(tmp_path / "missing", tmp_path, override)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_dit_model_config_in_the_flux_app_names_the_flux_ones(tmp_path):
    from taylorseer_flux.sample import main

    with pytest.raises(ValueError, match="is a dit model config.*model=flux_dev|flux_kontext|flux_schnell"):
        main(_compose(["model=digits", f"out_root={tmp_path}"]))


def test_cache_offload_runs_through_the_app(tiny_dir, tmp_path):
    # It used to crash after sampling: the FLOPs count on the meta device reached the offload copy.
    from taylorseer_flux.sample import main

    base = _app_overrides(tiny_dir, tmp_path, "warmup=false", "num_steps=12")
    kept = main(_compose(base + ["run_name=kept"]))
    offloaded = main(_compose(base + ["run_name=offloaded", "cache.offload=true"]))
    assert offloaded["compression"] == kept["compression"] > 1 and offloaded["cache_bytes"] == kept["cache_bytes"]
    image = "00000-A_cat_holding_a_sign_that_says_hello_world.png"
    assert (tmp_path / "flux" / "offloaded" / image).read_bytes() == (tmp_path / "flux" / "kept" / image).read_bytes()


def test_diffusers_hook_baseline_runs_in_the_same_app(tiny_dir, tmp_path):
    # The peer baseline of the tables: diffusers' own TaylorSeerCacheConfig with the same N, O, warm-up.
    from diffusers.models.transformers.transformer_flux import FluxAttention

    from taylorseer.perf.peers import diffusers_full_steps
    from taylorseer_flux.sample import main

    assert diffusers_full_steps(50, PAPER) == [0, 1, 2] + list(range(4, 50, 6))  # 11 of 50 (ours: 10)
    metrics = main(_compose(_app_overrides(tiny_dir, tmp_path, "warmup=false", "cache_impl=diffusers")))
    run = next((tmp_path / "flux").glob("flux-dev-N6-O1-W3-diffusers-50steps-32x32-seed0-*"))
    assert (run / "00000-A_cat_holding_a_sign_that_says_hello_world.png").is_file()
    assert metrics["full_steps"] == 11 and metrics["flops_total"] < metrics["flops_uncached"]
    # Its forecast step still runs the feed-forwards (it hooks attention only): far less compression than ours.
    ours = main(_compose(_app_overrides(tiny_dir, tmp_path, "warmup=false")))
    assert 1 < metrics["compression"] < ours["compression"]
    # The schedule we count is the one the hook runs: attention processors run on exactly those steps.
    pipe = load_flux(str(tiny_dir), dtype=torch.float32, device="cpu")
    from taylorseer.perf import peers

    steps, seen = [], set()
    attentions = [m for m in pipe.transformer.modules() if isinstance(m, FluxAttention)]

    def counting(processor):
        def run(*args, **kwargs):
            seen.add(len(steps))
            return processor(*args, **kwargs)

        return run

    for m in attentions:
        m.processor = counting(m.processor)
    peers.enable(pipe.transformer, PAPER)
    generate(pipe, ["a photo of the cat"], [0], **CALL, callback_on_step_end=lambda *a: steps.append(1) or {})
    assert sorted(seen) == diffusers_full_steps(STEPS, PAPER)
