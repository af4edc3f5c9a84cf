"""The bundled FLUX-architecture digits model: its record, FLUX's main command on it out of the box, the paper's
FLUX defaults on its learned flow-matching trajectory, and training that resumes after a kill to the same weights.

Deterministic: CPU, float32, fixed seeds. Thresholds leave room for BLAS differences between machines, not
for a broken cache; the measured values are in docs/schedules.md.
"""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import taylorseer
from taylorseer import CacheConfig
from taylorseer_flux import digits
from taylorseer_flux.pipeline import generate, load_flux

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = digits.ASSETS.parent


def test_prompts_name_the_digit():
    assert [digits.prompt_of(d) for d in (0, 7)] == ["digit 0", "digit 7"]
    assert digits.label_of(" digit 7 ") == 7
    with pytest.raises(ValueError, match="names no digit"):
        digits.label_of("a cat")


def test_bundled_pipeline_is_what_its_record_says():
    record = json.loads(digits.RECORD.read_text())
    assert record["architecture"]["transformer"]["num_layers"] == 2
    assert record["architecture"]["transformer"]["num_single_layers"] == 4
    assert record["vae"]["recon_psnr_db"] > 35  # measured 43.4 dB on the training digits
    assert record["transformer"]["final_loss_last200"] < 0.5 * record["transformer"]["first_loss_first50"]
    config = json.loads((digits.PIPELINE_DIR / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in ("num_layers", "num_single_layers", "attention_head_dim")} == \
        {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32}


@pytest.fixture(scope="module")
def bundle():
    from taylorseer_dit.digits import load_classifier

    pipe = load_flux(str(digits.PIPELINE_DIR))
    prompts = [digits.prompt_of(i % 10) for i in range(40)]
    seeds = list(range(40))
    reference = generate(pipe, prompts, seeds, num_steps=50, height=16, width=16, max_sequence_length=8,
                         output_type="pt").images
    return pipe, prompts, seeds, torch.stack(list(reference)), load_classifier()


def _sample(bundle, config):
    from taylorseer_flux.cache import attach_cache

    pipe, prompts, seeds, _, _ = bundle
    attach_cache(pipe.transformer, config, 50)
    try:
        out = generate(pipe, prompts, seeds, num_steps=50, height=16, width=16, max_sequence_length=8,
                       output_type="pt")
        return torch.stack(list(out.images)), out.full_steps
    finally:
        taylorseer.remove(pipe.transformer)


def _psnr(a, b):
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def test_uncached_samples_are_the_digits_their_prompts_name(bundle):
    _, prompts, _, reference, classifier = bundle
    small = torch.nn.functional.avg_pool2d(reference, 2) * 2 - 1
    with torch.no_grad():
        predicted = classifier(small).argmax(1)
    labels = torch.tensor([digits.label_of(p) for p in prompts])
    assert float((predicted == labels).float().mean()) >= 0.9


def test_paper_flux_defaults_on_the_learned_trajectory(bundle):
    # N=6, O=1, warm-up 3: 10 of 50 steps. Forecasting stays closer to the uncached images than reuse (FORA)
    # at the same computed steps, as the paper reports on FLUX.1-dev; interval 1 changes nothing.
    reference = bundle[3]
    same, _ = _sample(bundle, CacheConfig(interval=1, max_order=1, first_enhance=3))
    assert torch.equal(same, reference)
    taylor, steps = _sample(bundle, CacheConfig(interval=6, max_order=1, first_enhance=3))
    fora, _ = _sample(bundle, CacheConfig(interval=6, max_order=0, first_enhance=3))
    assert steps == {"cond": 10}
    assert _psnr(taylor, reference) > _psnr(fora, reference) + 3.0


def test_sample_flux_runs_the_bundled_model_out_of_the_box(tmp_path, monkeypatch):
    from taylorseer_flux import sample as sample_app

    monkeypatch.chdir(tmp_path)  # the bundled model is found from any working directory
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="sample_flux", overrides=["model=digits_flux", f"out_root={tmp_path}",
                                                           "progress=false", "warmup=false", "batch_size=10"])
    metrics = sample_app.main(cfg)
    assert metrics["num_items"] == 10 and metrics["full_steps"] == 10
    folder = sample_app.run_dir(cfg)
    assert folder.parent == tmp_path / "flux" and folder.name.startswith("flux-digits-N6-O1-W3-50steps-16x16-")
    assert sorted(p.name for p in folder.glob("*.png"))[:2] == ["00000-digit_0.png", "00001-digit_1.png"]


def test_training_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    settings = ["vae_steps=3", "vae_batch_size=8", "steps=4", "batch_size=8", "save_every=2", "warmup=2"]

    def train(out, kill_at=None):
        calls = {"n": 0}
        real = torch.nn.functional.mse_loss

        def mse(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "mse_loss", mse)
        try:
            digits.main(settings + [f"out={out}"])
        finally:
            monkeypatch.setattr(torch.nn.functional, "mse_loss", real)

    train(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed", kill_at=3 + 3)  # 3 VAE steps, then the 3rd transformer step
    assert (tmp_path / "killed.resume.pt").is_file()
    train(tmp_path / "killed")
    assert not (tmp_path / "killed.resume.pt").exists()
    for component in ("transformer", "vae"):
        a = (tmp_path / "straight" / component / "diffusion_pytorch_model.safetensors").read_bytes()
        b = (tmp_path / "killed" / component / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == b, component
    record = json.loads((tmp_path / "killed.json").read_text())
    assert record["transformer"]["steps"] == 4 and np.isfinite(record["transformer"]["final_loss_last200"])
