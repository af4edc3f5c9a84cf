"""TaylorSeer-DiT: checkpoint loading, samplers, the cache on real sampling loops, the Hydra apps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from PIL import Image

import taylorseer
from taylorseer import CacheConfig, count_flops
from taylorseer_dit import pipeline
from taylorseer_dit import sample as sample_app
from taylorseer_dit.cache import attach_cache, cached_module_names
from taylorseer_dit.diffusion import GaussianDiffusion, space_timesteps
from taylorseer_dit.models import DiT_models
from taylorseer_dit.pipeline import sample

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = ["model.name=DiT-Tiny/2", "model.image_size=64", "model.num_classes=10", "progress=false"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny DiT saved under its official-style name and a tiny SD-style VAE saved with diffusers."""
    from diffusers.models import AutoencoderKL

    d = tmp_path_factory.mktemp("tiny_dit")
    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10)
    model.initialize_weights(zero_init=False)
    torch.save(model.state_dict(), d / pipeline.official_name("DiT-Tiny/2", 64))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(d / "vae")
    return d, model.eval()


def test_official_checkpoint_format_loads_through_the_same_loader(tiny_assets):
    d, original = tiny_assets
    path = pipeline.find_checkpoint(None, "DiT-Tiny/2", 64, str(d))
    assert path.name == "DiT-Tiny-2-64x64.pt"
    loaded = pipeline.load_dit(path, "DiT-Tiny/2", 64, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), original(x, t, y))
    # the released XL/2 key names and shapes (docs/dit.md)
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"](input_size=32)
    shapes = {k: tuple(v.shape) for k, v in xl.state_dict().items()}
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["t_embedder.mlp.0.weight"] == (1152, 256)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.27.mlp.fc1.weight"] == (4608, 1152)
    assert shapes["blocks.27.adaLN_modulation.1.weight"] == (6912, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)


def test_ema_wrapped_checkpoint_and_wrong_architecture(tiny_assets, tmp_path):
    d, original = tiny_assets
    torch.save({"ema": original.state_dict(), "opt": {}}, tmp_path / "trained.pt")
    assert torch.equal(pipeline.load_dit(tmp_path / "trained.pt", "DiT-Tiny/2", 64, 10).pos_embed,
                       original.pos_embed)
    with pytest.raises(ValueError, match="does not fit DiT-S/2 at 64px.*shape mismatches"):
        pipeline.load_dit(tmp_path / "trained.pt", "DiT-S/2", 64, 10)


def test_missing_checkpoint_error_names_file_places_and_fix(tmp_path):
    with pytest.raises(pipeline.CheckpointNotFoundError) as err:
        pipeline.find_checkpoint(None, "DiT-XL/2", 256, str(tmp_path))
    msg = str(err.value)
    assert "DiT-XL-2-256x256.pt not found" in msg and str(tmp_path) in msg
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in msg
    assert "model.checkpoint=" in msg


def test_dit_xl2_flops_match_the_paper():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
        x, t, y = torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    macs = count_flops(lambda: model(x, t, y)) / 2
    assert abs(macs / 118.6e9 - 1) < 0.02  # DiT paper: 118.6 Gflops (multiply-adds) per forward at 256


# Upstream's `sample.py --ddim-sample --num-sampling-steps 50` (create_diffusion("50")): the paper's FID setting.
UPSTREAM_DDIM50 = [0, 20, 41, 61, 82, 102, 122, 143, 163, 183, 204, 224, 245, 265, 285, 306, 326, 347, 367, 387, 408,
                   428, 449, 469, 489, 510, 530, 550, 571, 591, 612, 632, 652, 673, 693, 714, 734, 754, 775, 795, 816,
                   836, 856, 877, 897, 917, 938, 958, 979, 999]


def test_respacing():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert GaussianDiffusion(50, "ddim").timestep_map.tolist() == UPSTREAM_DDIM50  # the default: upstream's
    stride = GaussianDiffusion(50, "ddim", spacing="ddim")  # still selectable by name
    assert stride.timestep_map.tolist() == list(range(0, 1000, 20)) and stride.betas[0] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="spacing='uniform' is invalid"):
        GaussianDiffusion(50, "ddim", spacing="uniform")


def test_every_dit_entry_point_defaults_to_upstream_spacing(monkeypatch):
    from taylorseer_dit import demo

    for name in ("sample_dit", "sample_dit_ddp", "demo"):
        assert _compose(name, []).spacing == "even", name
    built = []

    class Recording(GaussianDiffusion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.timestep_map.tolist())
            raise KeyboardInterrupt  # stop the demo right after it built its sampler

    monkeypatch.setattr(demo, "GaussianDiffusion", Recording)
    with pytest.raises(KeyboardInterrupt):
        demo.main(_compose("demo", ["num_samples=10", "progress=false"]))
    assert built == [UPSTREAM_DDIM50]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_interval_one_sampling_is_bit_identical(tiny_assets, sampler):
    _, model = tiny_assets
    diffusion = GaussianDiffusion(12, sampler)
    labels = torch.tensor([1, 5, 9])
    reference = sample(model, diffusion, labels, cfg_scale=1.5, seed=3)
    attach_cache(model, CacheConfig(interval=1, max_order=2, first_enhance=2), 12)
    try:
        assert torch.equal(sample(model, diffusion, labels, cfg_scale=1.5, seed=3), reference)
    finally:
        taylorseer.remove(model)


@pytest.mark.parametrize("interval, n_full", [(3, 18), (4, 14), (5, 11)])
def test_real_sampling_loop_follows_the_paper_schedule(tiny_assets, interval, n_full):
    _, model = tiny_assets
    diffusion = GaussianDiffusion(50, "ddim")
    cache = attach_cache(model, CacheConfig(interval=interval, max_order=2, first_enhance=2), 50)
    try:
        first = sample(model, diffusion, torch.tensor([2]), cfg_scale=1.5, seed=0)
        assert sum(r.full for r in cache.history) == n_full and len(cache.history) == 50
        second = sample(model, diffusion, torch.tensor([2]), cfg_scale=1.5, seed=0)
        assert torch.equal(first, second)  # state reset between calls
    finally:
        taylorseer.remove(model)
    assert "forward" not in model.blocks[0].mlp.__dict__


def _compose(config_name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def test_sample_app_end_to_end(tiny_assets, tmp_path):
    d, _ = tiny_assets
    cfg = _compose("sample_dit", TINY_OVERRIDES + [
        f"model.ckpt_dir={d}", f"model.vae={d / 'vae'}", f"out_root={tmp_path}", "class_labels=[0,3]",
        "num_steps=10", "cache.interval=4", "cache.max_order=1", "compare_uncached=true"])
    metrics = sample_app.main(cfg)
    run = next((tmp_path / "dit").glob("DiT-Tiny-2-64-N4-O1-W2-ddim10-cfg1.5-seed0-*"))
    assert sorted(p.name for p in run.glob("*.png")) == ["0000-class0.png", "0001-class3.png", "grid.png"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["full_steps"] == 4 and on_disk["num_steps"] == 10  # 0, 1, 5, 9
    assert on_disk["flops_total"] == 4 * on_disk["flops_full_step"] + 6 * on_disk["flops_forecast_step"]
    assert on_disk["flops_uncached"] == 10 * on_disk["flops_full_step"]
    assert on_disk["cache_bytes"] > 0 and on_disk["wall_speedup"] > 0 and on_disk["psnr_vs_uncached"] > 10
    assert metrics["cache_tag"] == "N4-O1-W2"
    assert (run / "uncached" / "grid.png").is_file() and (run / "config.yaml").is_file()


def test_bad_settings_fail_before_any_model_is_loaded(tmp_path):
    # The checkpoint does not exist: a CheckpointNotFoundError would mean validation came too late.
    cfg = _compose("sample_dit", TINY_OVERRIDES + [f"model.ckpt_dir={tmp_path}", "cache.interval=0"])
    with pytest.raises(ValueError, match="cache.interval=0 is invalid"):
        sample_app.main(cfg)
    cfg = _compose("sample_dit", TINY_OVERRIDES + [f"model.ckpt_dir={tmp_path}", "cache.max_order=-1"])
    with pytest.raises(ValueError, match="cache.max_order=-1"):
        sample_app.main(cfg)
    with pytest.raises(ConfigCompositionException, match="intervall"):
        _compose("sample_dit", ["cache.intervall=4"])
    cfg = _compose("sample_dit", TINY_OVERRIDES + [f"model.ckpt_dir={tmp_path}", "class_labels=[1,2]"])
    with pytest.raises(pipeline.CheckpointNotFoundError, match="DiT-Tiny-2-64x64.pt not found"):
        sample_app.main(cfg)


def test_sample_ddp_two_processes_and_resume(tiny_assets, tmp_path):
    d, _ = tiny_assets
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "taylorseer_dit.sample_ddp", *TINY_OVERRIDES, f"model.ckpt_dir={d}", f"model.vae={d / 'vae'}",
           f"out_root={tmp_path}", "num_samples=7", "batch_size=2", "num_steps=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    run = tmp_path / "dit_fid" / "DiT-Tiny-2-64-N3-O3-W2-ddim6-cfg1.5-seed0"
    pngs = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(7)]  # exactly the samples asked for
    arr = np.load(run / "samples_7.npz")["arr_0"]
    assert arr.shape == (7, 16, 16, 3) and arr.dtype == np.uint8
    assert len({a.tobytes() for a in arr}) == 7  # distinct samples, none duplicated

    before = {p.name: p.read_bytes() for p in pngs}
    kept_mtime = (run / "samples" / "000000.png").stat().st_mtime_ns
    for name in ("000002.png", "000005.png"):
        (run / "samples" / name).unlink()
    # Resumed in one process with another batch size: sample i depends on (seed, i) only.
    single = [sys.executable, "-m", "taylorseer_dit.sample_ddp", *cmd[cmd.index("taylorseer_dit.sample_ddp") + 1:],
              "batch_size=3"]
    subprocess.run(single, check=True, env=env, capture_output=True, timeout=300)
    assert (run / "samples" / "000000.png").stat().st_mtime_ns == kept_mtime  # untouched
    for name in ("000002.png", "000005.png"):  # regenerated, identical
        assert (run / "samples" / name).read_bytes() == before[name]
    np.testing.assert_array_equal(np.load(run / "samples_7.npz")["arr_0"], arr)
    assert np.asarray(Image.open(run / "samples" / "000002.png")).shape == (16, 16, 3)  # tiny VAE: 2x up
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_items"] == 7 and metrics["complete"] and metrics["npz"].endswith("samples_7.npz")
    lines = [json.loads(line) for f in sorted((run / "records").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2, 2, 3, 4, 5, 5, 6]  # made once, remade only when deleted
    # Another checkpoint into the same folder is refused (it used to pack the first model's samples).
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(1)
    torch.save(DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10).state_dict(), other / "DiT-Tiny-2-64x64.pt")
    moved = [a if not a.startswith("model.ckpt_dir=") else f"model.ckpt_dir={other}" for a in single]
    result = subprocess.run(moved, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "holds outputs made with other settings (resolved.checkpoint:" in result.stderr
    assert "run_name=" in result.stderr


def test_short_forecast_block_forward_equals_forecasting_the_modules(tiny_assets):
    # attach_cache's block forward (gates only + fused gated adds) vs the plain module wrappers
    _, model = tiny_assets
    diffusion = GaussianDiffusion(20, "ddim")
    config = CacheConfig(interval=4, max_order=2, first_enhance=2)
    names = cached_module_names(model)
    assert names == [f"blocks.{i}.{m}" for i in range(len(model.blocks)) for m in ("attn", "mlp")]
    taylorseer.apply(model, config, modules=names, num_steps=20)
    try:
        plain = sample(model, diffusion, torch.tensor([1, 4]), cfg_scale=1.5, seed=5)
    finally:
        taylorseer.remove(model)
    attach_cache(model, config, 20)
    try:
        short = sample(model, diffusion, torch.tensor([1, 4]), cfg_scale=1.5, seed=5)
    finally:
        taylorseer.remove(model)
    assert not torch.equal(short, sample(model, diffusion, torch.tensor([1, 4]), cfg_scale=1.5, seed=5))
    assert torch.allclose(short, plain, atol=1e-5, rtol=1e-5)


def test_checkpoint_files_that_cannot_be_used_fail_with_one_message(tiny_assets, tmp_path):
    d, original = tiny_assets
    path = d / pipeline.official_name("DiT-Tiny/2", 64)
    # DiT's train.py format: {"model", "ema", "opt", "args"} with args an argparse.Namespace.
    import argparse

    train_ckpt = tmp_path / "0400000.pt"
    state = original.state_dict()
    torch.save({"model": state, "ema": state, "opt": {"state": {}}, "args": argparse.Namespace(lr=1e-4)}, train_ckpt)
    loaded = pipeline.load_dit(train_ckpt, "DiT-Tiny/2", 64, num_classes=10)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>404 not found</html>")
    for bad in (truncated, garbage):
        with pytest.raises(pipeline.CheckpointError, match=f"{bad.name} is not a readable PyTorch checkpoint"):
            pipeline.load_dit(bad, "DiT-Tiny/2", 64, num_classes=10)
    lists = tmp_path / "list.pt"
    torch.save([1, 2], lists)
    with pytest.raises(pipeline.CheckpointError, match="holds a list without a state dict"):
        pipeline.load_dit(lists, "DiT-Tiny/2", 64, num_classes=10)


def test_compile_and_attention_backend_settings_of_the_app(tmp_path, capsys):
    """compile=true samples the same images as eager (8-bit PNGs, 1e-4-relative float differences at most);
    an attention backend that cannot run here fails before sampling, in one line naming the fallback."""
    import numpy as np

    base = ["model=digits", f"out_root={tmp_path}", "progress=false", "num_steps=10", "class_labels=[1,7]"]
    eager = sample_app.main(_compose("sample_dit", base + ["run_name=eager"]))
    compiled = sample_app.main(_compose("sample_dit", base + ["run_name=compiled", "compile=true"]))
    assert compiled["full_steps"] == eager["full_steps"]
    for name in ("0000-class1.png", "0001-class7.png"):
        a = np.asarray(Image.open(tmp_path / "dit" / "eager" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "dit" / "compiled" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1
    with pytest.raises(RuntimeError, match="attention_backend=sdpa") as info:
        sample_app.main(_compose("sample_dit", base + ["run_name=flash", "attention_backend=flash"]))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "dit" / "flash").exists()  # refused before anything was written


def test_the_untimed_warm_up_changes_no_sample(tmp_path):
    """warmup=true (default) runs one untimed batch first, stopped once every forecast kernel has run; the
    samples are those of warmup=false byte for byte, and the cache holds nothing of it."""
    from taylorseer_dit import sample_ddp

    base = ["model=digits", f"out_root={tmp_path}", "progress=false", "num_steps=12", "num_samples=6",
            "batch_size=3", "cache.interval=3", "cache.max_order=2"]
    sample_ddp.main(_compose("sample_dit_ddp", base + ["run_name=warm", "warmup=true"]))
    sample_ddp.main(_compose("sample_dit_ddp", base + ["run_name=cold", "warmup=false"]))
    for i in range(6):
        name = f"samples/{i:06d}.png"
        warm, cold = (tmp_path / "dit_fid" / run / name for run in ("warm", "cold"))
        assert warm.read_bytes() == cold.read_bytes()
