"""Entry points that only README commands ran before the fast tier (tests/conftest.py), each in seconds: the apps'
calibrate commands (their files read back by the calibrated schedule), the digits DiT's training (resumed after a
kill to the same weights), the GPU benchmark's dry run."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from taylorseer import CacheConfig, full_steps
from taylorseer.core import calibration

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name=name, overrides=overrides)


@pytest.mark.parametrize("app, overrides", [
    ("dit", ["model=digits", "num_steps=5", "samples=10", "batch_size=5", "cfg_scale=2.0"]),
    ("flux", ["model=digits_flux", "num_steps=4", "samples=4", "batch_size=4", "warmup=false"]),
])
def test_calibrate_writes_a_file_the_calibrated_schedule_reads(app, overrides, tmp_path):
    if app == "dit":
        from taylorseer_dit.calibrate import main
    else:
        from taylorseer_flux.calibrate import main
    steps = int(next(o for o in overrides if o.startswith("num_steps=")).split("=")[1])
    out = main(_compose(f"calibrate_{app}", [*overrides, f"out_root={tmp_path}", "progress=false",
                                             "sketch_size=64"]))
    assert out.parent == tmp_path / "calibrations" and out.is_file()
    cal = calibration.load(out)
    assert cal.trajectory.shape[0] == steps and bool((cal.sensitivity > 0).all())
    assert calibration.flops_of(out) > 0
    config = CacheConfig(schedule="calibrated", budget=3, calibration=str(out), first_enhance=1)
    placed = full_steps(steps, config)
    assert len(placed) == 3 and placed[0] == 0
    with pytest.raises(ValueError, match="expected a multiple of the .* sampling steps"):
        main(_compose(f"calibrate_{app}", [*overrides, f"out_root={tmp_path}", "samples=3"]))


def test_digits_dit_training_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch):
    from taylorseer_dit import digits as train_digits

    settings = ["steps=4", "batch_size=8", "save_every=2", "warmup=2", "classifier_steps=0"]

    def train(out: Path, kill_at: int | None = None):
        calls = {"n": 0}
        real = torch.nn.functional.mse_loss

        def mse(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "mse_loss", mse)
        try:
            train_digits.main([*settings, f"out={out}"])
        finally:
            monkeypatch.setattr(torch.nn.functional, "mse_loss", real)

    train(tmp_path / "straight.pt")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "killed.pt", kill_at=3)  # after the checkpoint of step 2
    assert (tmp_path / "killed.resume.pt").is_file()
    train(tmp_path / "killed.pt")
    assert not (tmp_path / "killed.resume.pt").exists()
    straight, resumed = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("straight", "killed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(SystemExit, match="unknown option 'stpes'"):
        train_digits.main(["stpes=4"])


def test_gpu_benchmark_dry_run_in_process(tmp_path):
    """eval/bench_gpu.py's every-variant dry run, one model and no compile (the whole script, compiling: the full
    tier's tests/test_benchmark.py::test_gpu_script_dry_run_covers_every_code_path)."""
    import json

    from taylorseer_eval.bench_gpu import main

    main(["--dry-run", "--out", str(tmp_path), "--models", "dit", "--compile-models"])
    data = json.loads((tmp_path / "bench_gpu.json").read_text())
    rows = {r["variant"]: r for r in data["rows"] if r["family"] == "dit"}
    for variant in ("uncached", "ours O=1", "ours O=2", "ideal"):
        assert rows[variant]["error"] is None and rows[variant]["times"], variant
    assert rows["uncached"]["rel_error"] == 0.0 and data["setup"]["device"].startswith("CPU")
