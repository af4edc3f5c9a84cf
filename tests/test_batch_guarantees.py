"""What a batch user relies on (issue 20): a run folder, a calibration, a metric or a sweep never reports a
number of other settings, a failure is never reported as success, and every value typed is checked first.

Each test is a case as a user meets it, on the bundled digits models (CPU, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from taylorseer.harness import calibrate, runfolder
from taylorseer.harness.diffusers_io import read_prompts
from taylorseer.harness.runfolder import Records, RunFolderError
from taylorseer.harness.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["model=digits", "progress=false", "device=cpu", "warmup=false"]
DIGITS_FLUX = ["model=digits_flux", "progress=false", "device=cpu", "warmup=false"]


@pytest.fixture(autouse=True)
def _own_fingerprint_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAYLORSEER_CACHE_DIR", str(tmp_path / "fingerprint-cache"))


def _compose(config_name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


def _ddp(tmp_path, *extra):
    from taylorseer_dit import sample_ddp

    return sample_ddp.main(_compose("sample_dit_ddp", DIGITS + [f"out_root={tmp_path}", "num_steps=4", *extra]))


# ----------------------------------------------------------------------------------- run identity


def test_weights_of_the_same_size_with_other_content_are_another_run(tmp_path):
    """A copy of digits_flux with one middle tensor scaled by 1.5 (same file size) is refused in the first
    model's folder; an identical copy under another path resumes, and config.yaml then agrees with
    metrics.json on the model path."""
    from safetensors.torch import load_file, save_file

    from taylorseer_flux import sample

    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(ROOT / "assets" / "digits_flux", same)
    shutil.copytree(ROOT / "assets" / "digits_flux", changed)
    weights = next((changed / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    middle = sorted(tensors)[len(tensors) // 2]
    tensors[middle] = tensors[middle] * 1.5
    size = weights.stat().st_size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    common = DIGITS_FLUX + [f"out_root={tmp_path / 'runs'}", "num_steps=2", "prompt=digit 3", "run_name=r"]
    sample.main(_compose("sample_flux", common))
    with pytest.raises(RunFolderError, match=r"other settings \(resolved.weights: "):
        sample.main(_compose("sample_flux", common + [f"model.path={changed}"]))
    sample.main(_compose("sample_flux", common + [f"model.path={same}"]))  # same bytes elsewhere: done already
    run = tmp_path / "runs" / "flux" / "r"
    written = (run / "config.yaml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"path: {same}" in written and metrics["run_config"]["model"]["path"] == str(same)


def test_weight_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"\x01" * 1000)
    first = runfolder.file_fingerprint(path)
    cache = json.loads(runfolder.fingerprint_cache_file().read_text())
    assert cache[str(path.resolve())]["hash"] == first
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if Path(file) == path:
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert runfolder.file_fingerprint(path) == first and reads == []  # a rerun reads no weight again
    monkeypatch.undo()
    data = bytearray(path.read_bytes())
    data[500] = 2  # the middle of the file, same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert runfolder.file_fingerprint(path) != first


def test_batch_size_is_in_the_identity_of_a_batch_wide_schedule(tmp_path):
    """Under cache.schedule=adaptive the full/forecast decision covers the whole batch: another batch size
    is another run (it said "0 new" and reported the old figures)."""
    adaptive = ["num_samples=4", "cache.schedule=adaptive", "cache.budget=0", "run_name=a"]
    _ddp(tmp_path, *adaptive, "batch_size=1")
    with pytest.raises(RunFolderError, match=r"batch_size: 1 -> 4"):
        _ddp(tmp_path, *adaptive, "batch_size=4")
    base = {"cache": {"schedule": "interval"}, "batch_size": 2}
    assert "batch_size" not in runfolder.identity(base)  # sample i depends on (seed, i) alone there
    assert runfolder.identity({**base, "cache": {"schedule": "adaptive"}})["resolved.world_size"] == 1


# ----------------------------------------------------------------------------------- calibrations

CAL_DIT = "cache.calibration=assets/calibrations/digits_dit-ddim50-cfg2.json"
CAL_FLUX = "cache.calibration=assets/calibrations/digits_flux-50steps.json"
CALIBRATED = ["cache.schedule=calibrated", "cache.budget=10", "cache.first_enhance=1", "num_steps=50"]


def _dit_identity(overrides):
    from taylorseer_dit import sample

    cfg = _compose("sample_dit_ddp", DIGITS + ["cfg_scale=2.0", *CALIBRATED, *overrides])
    return sample.run_identity(cfg, torch.device("cpu"), torch.float32, sample.weights_identity(cfg))


@pytest.mark.parametrize("overrides, difference", [
    ([CAL_FLUX], "app: made for flux, this run dit"),
    ([CAL_DIT, "cfg_scale=1.5"], "guidance: made for cfg_scale=2, this run cfg_scale=1.5"),
    ([CAL_DIT, "spacing=ddim"], "spacing: made for even, this run ddim"),
    ([CAL_DIT, "sampler=ddpm"], "sampler: made for ddim, this run ddpm"),
])
def test_a_calibration_made_for_other_settings_is_refused_in_one_line(overrides, difference):
    with pytest.raises(calibrate.CalibrationMismatchError) as info:
        _dit_identity(overrides)
    message = str(info.value)
    assert difference in message and "\n" not in message and "accept_calibration_mismatch=true" in message


def test_the_bundled_calibration_matches_its_experiments_and_a_mismatch_can_be_accepted():
    ident = _dit_identity([CAL_DIT])
    assert ident["resolved.calibration"].startswith("sha256:") and "resolved.calibration_mismatch" not in ident
    accepted = _dit_identity([CAL_DIT, "cfg_scale=1.5", "accept_calibration_mismatch=true"])
    assert accepted["accept_calibration_mismatch"] is True  # the run folder records it
    assert "guidance: made for cfg_scale=2" in accepted["resolved.calibration_mismatch"]


def test_the_flux_app_refuses_a_dit_calibration():
    from taylorseer_flux import sample

    cfg = _compose("sample_flux", DIGITS_FLUX + [*CALIBRATED, CAL_DIT])
    with pytest.raises(calibrate.CalibrationMismatchError, match="app: made for dit, this run flux"):
        sample.check_config(cfg)
    sample.check_config(_compose("sample_flux", DIGITS_FLUX + [*CALIBRATED, CAL_FLUX]))


def test_a_new_calibration_file_records_what_it_was_made_for(tmp_path):
    from taylorseer_dit import calibrate as dit_calibrate

    out = tmp_path / "cal.json"
    dit_calibrate.main(_compose("calibrate_dit", DIGITS + ["num_steps=4", "samples=4", "batch_size=4", "cfg_scale=2.0",
                                                           f"out={out}"]))
    made_for = json.loads(out.read_text())["made_for"]
    assert made_for["app"] == "dit" and made_for["weights"].startswith("sha256:") and made_for["num_steps"] == 4
    with pytest.raises(calibrate.CalibrationMismatchError, match="num_steps: made for 4, this run 50"):
        _dit_identity([f"cache.calibration={out}"])


# ----------------------------------------------------------------------------------- metrics over run folders


def _eval(*argv):
    from taylorseer_eval.cli import main

    return main(list(argv))


def test_a_metric_refuses_an_incomplete_run_or_marks_it_partial(tmp_path):
    _ddp(tmp_path, "num_samples=3", "batch_size=3", "cache=none", "run_name=r")
    run = tmp_path / "dit_fid" / "r"
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "samples" / "000002.png").unlink()  # as a run killed after 2 of its 3 samples leaves it
    metrics.update(complete=False, num_items=2)
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"incomplete \(2 of its 3 outputs\).*--partial"):
        _eval("digits", str(run))
    _eval("digits", str(run), "--partial")
    stored = json.loads((run / "metrics.json").read_text())["eval"]["digits"]
    assert stored["partial"] is True and stored["num_items"] == 2 and stored["num_items_expected"] == 3


def test_a_reference_of_another_model_is_refused(tmp_path):
    from taylorseer_flux import sample

    _ddp(tmp_path, "num_samples=2", "batch_size=2", "cache=none", "run_name=dit")
    sample.main(_compose("sample_flux", DIGITS_FLUX + [f"out_root={tmp_path}", "num_steps=2", "run_name=flux",
                                                       "prompt=[digit 0,digit 1]"]))
    with pytest.raises(ValueError, match="not the same model, size and seeds.*model.family is 'dit' there"):
        _eval("digits", str(tmp_path / "flux" / "flux"), "--reference", str(tmp_path / "dit_fid" / "dit"))


# ----------------------------------------------------------------------------------- prompt files, names, values


def test_prompt_files_are_read_as_text_files(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff# my prompts\r\na cat\r\n\r\n  # another comment\na dog\n".encode())
    assert read_prompts(prompt_file=str(path)) == ["a cat", "a dog"]
    path.write_bytes("\ufeffa cat\n".encode())
    assert read_prompts(prompt_file=str(path)) == ["a cat"]  # HunyuanVideo named it '\ufeffa cat-0.mp4'


@pytest.mark.parametrize("override, message", [
    ("run_name=../..", "run_name='../..' is invalid"),
    ("run_name=/tmp/elsewhere", "run_name='/tmp/elsewhere' is invalid"),
    ("run_name=a/../../b", "is invalid"),
    ("device=tpu", "device='tpu' is invalid"),
    ("device=mps", "device='mps' is invalid"),
    ("device=meta", "device='meta' is invalid"),
    ("device=cuda:x", "device='cuda:x' is invalid"),
])
def test_every_typed_value_is_checked_before_any_compute(override, message):
    from taylorseer_dit import sample_ddp

    for config, check in (("sample_dit_ddp", sample_ddp.check_config), ):
        with pytest.raises(SettingsError, match=message):
            check(_compose(config, DIGITS + [override]))
    from taylorseer_flux import sample

    with pytest.raises(SettingsError, match=message):
        sample.check_config(_compose("sample_flux", DIGITS_FLUX + [override]))


def test_a_cuda_index_that_is_not_there_is_one_line():
    from taylorseer.harness import distributed

    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        distributed.select_device("cuda:3")


def test_checkpoint_json_problems_name_the_file(tmp_path):
    from taylorseer_dit import sample_ddp
    from taylorseer_dit.pipeline import CheckpointError

    ckpt = tmp_path / "digits_dit.pt"
    shutil.copy(ROOT / "assets" / "digits_dit.pt", ckpt)
    common = DIGITS + [f"out_root={tmp_path}", "num_samples=1", f"model.checkpoint={ckpt}"]
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'digits_dit.json'}.*is missing"):
        sample_ddp.main(_compose("sample_dit_ddp", common))
    (tmp_path / "digits_dit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="digits_dit.json .*cannot be read as JSON"):
        sample_ddp.main(_compose("sample_dit_ddp", common))
    (tmp_path / "digits_dit.json").write_text('{"other": 1}')
    with pytest.raises(CheckpointError, match='digits_dit.json .*has no "model" entry'):
        sample_ddp.main(_compose("sample_dit_ddp", common))


def test_calibrate_flux_with_a_dit_model_says_so():
    from taylorseer_flux import calibrate as flux_calibrate

    with pytest.raises(SettingsError, match="is a dit model config"):
        flux_calibrate.main(_compose("calibrate_flux", ["model=digits"]))


# ----------------------------------------------------------------------------------- outputs verified


def test_a_damaged_output_is_remade(tmp_path):
    _ddp(tmp_path, "num_samples=3", "batch_size=3", "cache=none", "run_name=r")
    run = tmp_path / "dit_fid" / "r"
    good = (run / "samples" / "000001.png").read_bytes()
    (run / "samples" / "000001.png").write_bytes(b"")  # zero bytes
    (run / "samples" / "000002.png").write_bytes((run / "samples" / "000002.png").read_bytes()[:40])  # cut
    assert sorted(Records(run).done(lambda r: [r["file"]])) == [0]
    _ddp(tmp_path, "num_samples=4", "batch_size=3", "cache=none", "run_name=r")  # more samples: packs them all
    assert (run / "samples" / "000001.png").read_bytes() == good
    assert Image.open(run / "samples" / "000002.png").size == (8, 8)
    assert (run / "samples_4.npz").is_file()
    (run / "samples_4.npz").write_bytes(b"")  # a damaged npz is packed again, not reported complete
    _ddp(tmp_path, "num_samples=4", "batch_size=3", "cache=none", "run_name=r")
    assert np.load(run / "samples_4.npz")["arr_0"].shape == (4, 8, 8, 3)


# ----------------------------------------------------------------------------------- processes


WORKER = """
import os, sys, time
from taylorseer.harness import distributed
session = distributed.init("cpu")
open(os.path.join(sys.argv[1], f"pid{session.rank}"), "w").write(str(os.getpid()))
time.sleep(120)
"""


def test_killing_the_launcher_stops_its_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launcher = subprocess.Popen([sys.executable, "-m", "taylorseer.harness.launch", "--standalone",
                                 "--nproc_per_node", "2", str(script), str(tmp_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all((tmp_path / f"pid{r}").is_file() for r in (0, 1)):
            time.sleep(0.5)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.5)
        assert not any(_alive(p) for p in pids), "workers outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("override, message", [
    ("num_samples=-5", "num_samples=-5 is invalid"),
    ("+foo=1", "unknown setting(s) ['foo']"),
    ("nosuchkey=1", "nosuchkey"),
])
def test_a_sweep_checks_every_point_before_launching(override, message, tmp_path):
    from taylorseer_eval.sweep import main

    with pytest.raises(ValueError) as info:
        main(["digits", override, f"out_root={tmp_path}"])
    text = str(info.value)
    assert message in text and "\n" not in text and "nothing was launched" in text
    assert not (tmp_path / "multirun").exists()


def test_a_sweep_with_a_failed_point_says_why_and_exits_non_zero(tmp_path):
    """A point that fails while running (here: a checkpoint cut short) is marked with its real reason in the
    table, and the sweep exits 1 after writing the table."""
    ckpt = tmp_path / "cut.pt"
    ckpt.write_bytes((ROOT / "assets" / "digits_dit.pt").read_bytes()[:5000])
    shutil.copy(ROOT / "assets" / "digits_dit.json", tmp_path / "cut.json")
    experiment = tmp_path / "two.yaml"
    experiment.write_text(
        "app: taylorseer_dit.sample_ddp\n"
        "common: [model=digits, num_samples=2, batch_size=2, num_steps=4, progress=false, device=cpu]\n"
        f"blocks: {{good: [cache=none], bad: [cache=none, run_name=bad, 'model.checkpoint={ckpt}']}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TAYLORSEER_CACHE_DIR": str(tmp_path / "fp")}
    result = subprocess.run([sys.executable, "-m", "taylorseer_eval.sweep", str(experiment), f"out_root={tmp_path}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "1 of 2 points did not finish ok" in result.stderr
    table = (tmp_path / "table.md").read_text()
    assert "failed: CheckpointError:" in table and "is not a readable PyTorch checkpoint" in table
    assert table.count("| ok |") == 1


JOB = """
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from taylorseer.harness import slurm_launcher
from taylorseer.harness.slurm_launcher import SweepFailures

slurm_launcher._job_place = lambda: ("7", 0, 1, "7_0_log.err", "7_0_log.out")  # no submitit folder here
callback = SweepFailures()
config = OmegaConf.create({})
callback.on_job_start(config)
failed = JobReturn(overrides=["num_steps=3"], status=JobStatus.FAILED, _return_value=ValueError("bad point"))
callback.on_job_end(config, failed)
print("the job function returned")
"""


def test_a_submitit_job_whose_python_raised_exits_non_zero(tmp_path):
    """Hydra catches the job's error and submitit pickles it back: the job's process used to exit 0 (Slurm:
    COMPLETED). Inside a submitit job a failed run's process now exits 1 (Slurm: FAILED)."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    outside = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert outside.returncode == 0  # Hydra's basic launcher: the sweep's own process is not stopped
    inside = subprocess.run([sys.executable, str(script)], env={**env, "SUBMITIT_EXECUTOR": "slurm"},
                            capture_output=True, text=True, timeout=120)
    assert inside.returncode == 1 and "the job function returned" in inside.stdout
    assert "failed: ValueError: bad point" in inside.stderr


def test_the_debris_of_a_killed_write_is_removed_on_resume(tmp_path):
    with runfolder.RunFolder.open(tmp_path, {"a": 1}):
        (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".tmp-abc123.png").write_bytes(b"half an image")
    with runfolder.RunFolder.open(tmp_path, {"a": 1}):
        assert not list(tmp_path.rglob(".tmp-*"))


def test_the_metric_command_checks_its_device_first(tmp_path):
    with pytest.raises(ValueError, match="--device tpu: device='tpu' is invalid"):
        _eval("digits", str(tmp_path), "--device", "tpu")
