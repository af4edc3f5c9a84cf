"""Schedule policies beside the paper's interval: pinned placements of the budget rule and of a calibration,
the adaptive policy's decisions and its bound on computed steps, FLOPs with the probe, clear errors."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from step_model import StepFeature

import taylorseer
from taylorseer import CacheConfig, full_steps, is_full_step
from taylorseer.core import calibration
from taylorseer.core.placement import estimated_error, optimise, warped
from taylorseer.core.policies import PROBE
from taylorseer.harness import calibrate

pytestmark = pytest.mark.usefixtures("one_thread")


def run(f, config, num_steps=50, probe="branch"):
    model = StepFeature(f)
    cache = taylorseer.apply(model, config, modules=["branch"], num_steps=num_steps, probe=probe)
    outs = [model(torch.zeros(3), torch.tensor(float(s)))[0].item() for s in range(num_steps)]
    return outs, model, cache


# ------------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("budget, warmup, last, expected", [
    (10, 1, 0, [0, 8, 15, 22, 29, 34, 40, 44, 47, 49]),
    (6, 1, 0, [0, 14, 26, 37, 45, 49]),
    (10, 2, 0, [0, 1, 10, 18, 25, 32, 38, 43, 47, 49]),
    (10, 3, 0, [0, 1, 2, 12, 21, 29, 36, 42, 46, 49]),
    (10, 2, 2, [0, 1, 12, 23, 32, 40, 46, 47, 48, 49]),
])
def test_budget_rule_places_exactly_k_steps_denser_at_the_end(budget, warmup, last, expected):
    config = CacheConfig(schedule="budget", budget=budget, first_enhance=warmup, last_full_steps=last)
    steps = full_steps(50, config)
    assert steps == expected and len(steps) == budget
    gaps = [b - a for a, b in zip(steps[warmup:], steps[warmup + 1:], strict=False)]
    assert all(later <= earlier + 1 for earlier, later in zip(gaps, gaps[1:], strict=False))  # +-1: rounding
    assert gaps[0] >= 2 * gaps[-1]  # sparse early, dense at the end


def test_budget_rule_edges():
    assert warped(50, 6, [0], power=1.0) == [0, 10, 20, 29, 39, 49]  # p = 1 is a uniform spread
    assert full_steps(5, CacheConfig(schedule="budget", budget=5, first_enhance=2)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cache.budget=60 is more than the 50 sampling steps"):
        full_steps(50, CacheConfig(schedule="budget", budget=60, first_enhance=1))
    with pytest.raises(ValueError, match="the number of sampling steps must be known"):
        is_full_step(3, CacheConfig(schedule="budget", budget=10, first_enhance=1))
    with pytest.raises(ValueError, match=r"leaves no room: the warm-up and forced last steps alone are 5"):
        full_steps(50, CacheConfig(schedule="budget", budget=4, first_enhance=2, last_full_steps=3))


def test_budget_schedule_runs_through_the_cache():
    config = CacheConfig(schedule="budget", budget=10, first_enhance=1, max_order=1)
    outs, model, _ = run(lambda s: 2.0 * s + 1.0, config)
    assert model.branch.steps == [0, 8, 15, 22, 29, 34, 40, 44, 47, 49]
    assert outs[8:] == pytest.approx([2.0 * s + 1.0 for s in range(8, 50)])  # order 1 exact on a line


def test_paper_default_is_unchanged():
    default = CacheConfig()
    assert default.schedule == "interval" and default.budget == 0 and default.tag == "N6-O1-W3"
    assert full_steps(50, default) == [0, 1, 2, 8, 14, 20, 26, 32, 38, 44]


@pytest.mark.parametrize("values, fragment", [
    (dict(schedule="budget"), "cache.budget=0 is invalid with cache.schedule=budget"),
    (dict(schedule="budget", budget=2, first_enhance=3), "at least the 3 warm-up step(s)"),
    (dict(budget=10), "cache.budget=10 is not used by cache.schedule=interval"),
    (dict(schedule="calibrated", budget=10), "cache.schedule=calibrated needs cache.calibration=<file>"),
    (dict(schedule="calibrated", budget=10, calibration="/nonexistent.json"), "no such file"),
    (dict(calibration="x.json"), "only read by cache.schedule=calibrated"),
    (dict(schedule="adaptive", threshold=0), "cache.threshold=0 is invalid: expected a number > 0"),
    (dict(probe="blocks.0"), "read by cache.schedule=adaptive only"),
    (dict(schedule="sometimes"), "cache.schedule='sometimes' is invalid: expected one of"),
])
def test_bad_policy_settings_name_the_field_and_the_fix(values, fragment):
    with pytest.raises(ValueError) as err:
        CacheConfig(**values)
    assert fragment in str(err.value)


def test_tags_name_policy_and_budget(tmp_path):
    assert CacheConfig(schedule="budget", budget=10, first_enhance=1).tag == "K10-O1-W1"
    assert CacheConfig(schedule="budget", budget=6, max_order=2, first_enhance=1, forecaster="feedback").tag == \
        "K6-O2-W1-feedback"
    assert CacheConfig(schedule="adaptive", threshold=0.1, budget=6, interval=20).tag == "A0.1-N20-K6-O1-W3"
    assert CacheConfig(schedule="adaptive", probe="blocks.2").tag == "A0.05-N6-K0-pblocks_2-O1-W3"
    path = _synthetic_calibration(tmp_path / "a.json")
    tag = CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1).tag
    assert tag.startswith("K6-cal") and len(tag.split("-")[1]) == 9 and tag.endswith("-O1-W1")
    path.write_text(json.dumps(dict(json.loads(path.read_text()), epsilon=0.06)))
    assert CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1).tag != tag


# -------------------------------------------------------------------------------------------- calibrated
def _synthetic_calibration(path, num_steps=20, weights=None):
    """A feature constant until step 10, then quadratic: the calibrated steps must go where it bends."""
    trajectory = [[1.0, 2.0] if s < 10 else [1.0 + 0.05 * (s - 9) ** 2, 2.0 - 0.03 * (s - 9) ** 2]
                  for s in range(num_steps)]
    data = {"format": calibration.FORMAT, "num_steps": num_steps, "samples": num_steps, "sketch_size": 2,
            "modules": 1, "epsilon": 0.05, "flops": {"per_run": 10, "runs": 2, "total": 20},
            "settings": {}, "timesteps": [1000.0 - 50 * s for s in range(num_steps)],
            "sensitivity": weights or [1.0] * num_steps, "trajectory": trajectory}
    path.write_text(json.dumps(data))
    return path


def test_calibrated_placement_is_pinned_and_beats_the_rule(tmp_path):
    path = _synthetic_calibration(tmp_path / "cal.json")
    config = CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1, max_order=1)
    steps = full_steps(20, config)
    assert steps == [0, 11, 12, 14, 16, 18]  # nothing to compute while the feature is constant
    cal = calibration.load(path)
    positions = cal.positions("index")
    error = lambda s: estimated_error(cal.trajectory, cal.sensitivity, positions, set(s), config)  # noqa: E731
    rule = full_steps(20, dataclasses.replace(config, schedule="budget", calibration=None))
    uniform = warped(20, 6, [0], power=1.0)
    assert error(steps) < error(rule) and error(steps) < error(uniform)
    assert error(steps) == pytest.approx(optimise(cal.trajectory, cal.sensitivity, positions, 6, [0], config)[1])


def test_calibrated_placement_follows_the_sensitivity(tmp_path):
    # The same trajectory, but errors after step 14 do not reach the output: no computed step is spent there.
    path = _synthetic_calibration(tmp_path / "cal.json", weights=[1.0] * 15 + [0.0] * 5)
    config = CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1, max_order=1)
    assert max(full_steps(20, config)) <= 15


def test_calibration_file_errors(tmp_path):
    path = _synthetic_calibration(tmp_path / "cal.json")
    config = CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1)
    with pytest.raises(ValueError, match="measured over 20 sampling steps, this run has 30: calibrate again"):
        full_steps(30, config)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a calibration file"):
        full_steps(20, dataclasses.replace(config, calibration=str(bad)))
    with pytest.raises(ValueError, match="recorded no timesteps"):
        calibration.Calibration(3, torch.zeros(3, 1), torch.ones(3)).positions("timestep")


class _Sampler(torch.nn.Module):
    """x_{s+1} = x_s + branch(x_s, s): a perturbation of the branch at step s reaches the output unchanged."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.branch = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return self.branch(x) + t * torch.arange(4.0)


def test_recorder_sketches_the_trajectory_and_measures_each_step(tmp_path):
    model, steps, samples = _Sampler(), 5, 10
    recorder = calibrate.Recorder(model, ["branch"], steps, samples, sketch_size=64, epsilon=0.1, seed=3,
                                    timestep_fn=lambda args, kwargs: args[1])

    def sample(x):
        for s in range(steps):
            x = x + model(x, torch.tensor(float(s)))
        return x

    x0 = torch.randn(samples, 4, generator=torch.Generator().manual_seed(0)) + 3
    with recorder.attached("record", offset=0, batch=samples):
        reference = sample(x0.clone())
    with recorder.attached("perturb", offset=0, batch=samples):
        perturbed = sample(x0.clone())
    trajectory = recorder.trajectory()
    assert trajectory.shape == (steps, 40)  # min(64 per module, 10 x 4 outputs) coordinates
    assert trajectory.pow(2).mean().item() == pytest.approx(1.0)  # unit RMS over the run
    # Sample i was perturbed at step i mod 5 only, so every sample changed, by epsilon-sized noise.
    changed = (perturbed - reference).abs().sum(dim=1)
    assert bool((changed > 0).all())
    sensitivity = recorder.sensitivity(reference, perturbed)
    assert sensitivity.shape == (steps,) and bool((sensitivity > 0).all())
    assert recorder.timesteps == [0.0, 1.0, 2.0, 3.0, 4.0]
    summary = calibrate.write(tmp_path / "c.json", recorder, reference, perturbed, 123, {"app": "test"})
    assert summary["flops"]["total"] == 246 and summary["num_steps"] == steps
    loaded = calibration.load(tmp_path / "c.json")
    assert torch.allclose(loaded.trajectory, trajectory, rtol=5e-5, atol=0)  # 5 significant digits in the file
    assert loaded.positions("timestep") == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert calibration.flops_of(tmp_path / "c.json") == 246
    with pytest.raises(ValueError, match="expected a multiple of the 5 sampling steps"):
        calibrate.Recorder(model, ["branch"], steps, 7)


def test_smoothing_keeps_a_smooth_curve_and_damps_noise():
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    truth = torch.exp(1.0 - 3 * x + 4 * x**2)  # U-shaped in log space, like the measured curves
    assert torch.allclose(calibrate.smooth(truth), truth, rtol=1e-9)
    noisy = truth * torch.exp(torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    error_raw = (noisy.log() - truth.log()).abs().mean()
    assert (calibrate.smooth(noisy).log() - truth.log()).abs().mean() < 0.4 * error_raw


# ---------------------------------------------------------------------------------------------- adaptive
def test_adaptive_computes_when_the_probe_forecast_fails_and_at_the_gap_bound():
    # A line: from the second computed step on, order 1 forecasts the probe exactly (error 0), so the only
    # computed steps after that are those the distance bound (interval) forces.
    config = CacheConfig(schedule="adaptive", threshold=0.01, interval=8, max_order=1, first_enhance=1)
    outs, model, cache = run(lambda s: 3.0 * s - 70.0, config, num_steps=30)
    history = cache.last_call.history if not cache.history else cache.history
    assert [r.step for r in history if r.full] == [0, 1, 9, 17, 25]
    errors = {r.step: r.error for r in history}
    assert errors[0] is None and errors[1] == pytest.approx(3 / 67)  # reuse of f(0) at step 1: |3| / |-67|
    assert errors[2] == pytest.approx(0.0, abs=1e-7)
    assert model.branch.steps == list(range(30))  # the probe (here the branch itself) runs on every step
    assert outs == pytest.approx([3.0 * s - 70.0 for s in range(30)])


@pytest.mark.parametrize("budget", [4, 7])
def test_adaptive_never_computes_more_than_its_budget(budget):
    # A feature no forecaster can follow: every step wants computing; the budget stops it.
    config = CacheConfig(schedule="adaptive", threshold=1e-6, budget=budget, interval=3, max_order=1,
                         first_enhance=1)
    _, _, cache = run(lambda s: float((-1) ** int(s) * (s + 1) ** 2), config, num_steps=20)
    full = [r.step for r in cache.history if r.full]
    assert full == list(range(budget))
    assert all(r.error is not None for r in cache.history[1:])


def test_adaptive_state_resets_between_calls():
    config = CacheConfig(schedule="adaptive", threshold=0.01, interval=8, max_order=1, first_enhance=1)
    model = StepFeature(lambda s: 3.0 * s - 70.0)
    cache = taylorseer.apply(model, config, modules=["branch"], num_steps=20, probe="branch")
    calls = []
    for _ in range(2):
        for s in range(20):
            model(torch.zeros(2), torch.tensor(float(s)))
        calls.append([r.step for r in cache.history if r.full])
        cache.reset()
    assert calls[0] == calls[1] == [0, 1, 9, 17]
    assert PROBE not in cache._contexts.get("default", type("C", (), {"states": {}})).states


def test_adaptive_probe_errors():
    model = StepFeature(lambda s: s)
    with pytest.raises(ValueError, match=r"cache.probe='brnch' is not a module of this model"):
        taylorseer.apply(model, CacheConfig(schedule="adaptive", probe="brnch"), modules=["branch"])
    # No probe given: the first cached block (here the only cached module) decides every undecided step.
    cache = taylorseer.apply(model, CacheConfig(schedule="adaptive", first_enhance=1), modules=["branch"])
    for s in range(3):
        model(torch.zeros(1), torch.tensor(float(s)))
    assert [r.error is not None for r in cache.history] == [False, True, True]
    taylorseer.remove(model)

    class TwoBranches(StepFeature):
        def __init__(self):
            super().__init__(lambda s: s)
            self.unused = torch.nn.Identity()

    model = TwoBranches()
    taylorseer.apply(model, CacheConfig(schedule="adaptive", first_enhance=1), modules=["branch"], probe="unused")
    model(torch.zeros(1), torch.tensor(0.0))
    model(torch.zeros(1), torch.tensor(1.0))  # step 1 is undecided, and nothing decides it
    with pytest.raises(RuntimeError, match="the probe module did not run during step 1"):
        model(torch.zeros(1), torch.tensor(2.0))


def test_full_steps_refuses_adaptive():
    with pytest.raises(ValueError, match="decides its computed steps while sampling"):
        full_steps(50, CacheConfig(schedule="adaptive"))


# ------------------------------------------------------------------------------------------------- FLOPs
def test_flops_of_adaptive_count_the_probe_and_the_steps_that_ran():
    from taylorseer_dit.cache import attach_cache
    from taylorseer_dit.flops import count_flops
    from taylorseer_dit.models import DiT_models

    torch.manual_seed(0)
    dit = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10).eval()
    depth = len(dit.blocks)
    reports = {}
    for name, config in {"interval": CacheConfig(interval=5, first_enhance=1),
                         "adaptive": CacheConfig(schedule="adaptive", budget=10, interval=5, first_enhance=1),
                         "budget": CacheConfig(schedule="budget", budget=10, first_enhance=1)}.items():
        attach_cache(dit, config, 50)
        reports[name] = count_flops(dit, config, 50, cfg_scale=1.0)
        taylorseer.remove(dit)
    interval, adaptive, budget = reports["interval"], reports["adaptive"], reports["budget"]
    assert adaptive.full_step_flops == interval.full_step_flops
    # The probe (block 0) runs whole on a forecast step: one block's share of what forecasting saves.
    probe = adaptive.forecast_step_flops - interval.forecast_step_flops
    assert probe > 0 and probe * depth == interval.full_step_flops - interval.forecast_step_flops
    assert adaptive.data_dependent and adaptive.full_steps == 10  # the bound, until the run says otherwise
    ran = adaptive.observed(7.5)
    assert ran.flops_total == 7.5 * adaptive.full_step_flops + 42.5 * adaptive.forecast_step_flops
    assert budget.full_steps == 10 and not budget.data_dependent


def test_sampling_metrics_use_the_observed_steps_and_report_the_calibration(tmp_path):
    from taylorseer.harness import runs
    from taylorseer.perf.flops import FlopsReport

    report = FlopsReport(50, 10, 1, 100, 10, data_dependent=True)
    config = CacheConfig(schedule="adaptive", budget=10)
    items = [dict(latency_s=1.0, full_steps=8), dict(latency_s=1.0, full_steps={"cond": 6, "uncond": 8})]
    metrics = runs.sampling_metrics(config, report, items)
    assert metrics["full_steps"] == 7.5 and metrics["flops_total"] == 7.5 * 100 + 42.5 * 10
    assert metrics["flops_data_dependent"] is True
    path = _synthetic_calibration(tmp_path / "cal.json")
    calibrated = CacheConfig(schedule="calibrated", budget=6, calibration=str(path), first_enhance=1)
    metrics = runs.sampling_metrics(calibrated, FlopsReport(20, 6, 1, 100, 10), [dict(latency_s=1.0)])
    assert metrics["flops_calibration"] == 20 and metrics["full_steps"] == 6


# ------------------------------------------------------------------------------------ through the DiT app
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base=None):
        return compose(config_name="sample_dit_ddp", overrides=overrides)


def test_dit_app_reports_what_the_schedule_really_did(tmp_path):
    from taylorseer.harness import runs
    from taylorseer.harness.runfolder import Records
    from taylorseer_dit import sample_ddp

    common = ["model=digits", "num_samples=10", "batch_size=5", "num_steps=50", "cfg_scale=2.0", "progress=false",
              f"out_root={tmp_path}", "cache.first_enhance=1", "cache.max_order=1"]
    adaptive = common + ["cache.schedule=adaptive", "cache.budget=8", "cache.interval=20", "cache.threshold=0.05"]
    folder = sample_ddp.run_dir(_compose(adaptive))
    assert folder.name == "DiT-Digits-A0.05-N20-K8-O1-W1-ddim50-cfg2-seed0"
    sample_ddp.main(_compose(adaptive))
    metrics = runs.read_json(folder / "metrics.json")
    counts = [r["full_steps"] for r in Records(folder).load().values()]
    assert len(counts) == 10 and all(c <= 8 for c in counts)
    assert metrics["full_steps"] == pytest.approx(sum(counts) / len(counts)) and metrics["flops_data_dependent"]
    expected = metrics["full_steps"] * metrics["flops_full_step"] + (50 - metrics["full_steps"]) * \
        metrics["flops_forecast_step"]
    assert metrics["flops_total"] == pytest.approx(expected)

    calibration_file = str(Path(__file__).resolve().parents[1] / "assets/calibrations/digits_dit-ddim50-cfg2.json")
    calibrated = common + ["cache.schedule=calibrated", "cache.budget=6", f"cache.calibration={calibration_file}"]
    cfg = _compose(calibrated)
    sample_ddp.main(cfg)
    metrics = runs.read_json(sample_ddp.run_dir(cfg) / "metrics.json")
    assert metrics["full_steps"] == 6 and metrics["flops_calibration"] == calibration.flops_of(calibration_file)


def test_full_size_flops_of_adaptive_on_the_meta_device():
    # FLUX.1-dev at 1024^2 counted without weights: the probe (the first of 19 double blocks) runs on forecast steps.
    from taylorseer_flux.flops import FLUX_DEV_TRANSFORMER, count_run_flops

    adaptive = count_run_flops(FLUX_DEV_TRANSFORMER, CacheConfig(schedule="adaptive", budget=10, first_enhance=3), 50)
    assert adaptive.full_step_flops / 1e12 == pytest.approx(74.3847, abs=1e-4)  # docs/performance.md: paper rule
    probe = adaptive.forecast_step_flops - 0.0176e12  # docs/performance.md: a forecast step of the paper rule
    assert 0.01 < probe / adaptive.full_step_flops < 0.05  # one double block of 19 double + 38 single blocks
    assert adaptive.observed(10).compression < 4.99  # the paper rule's 10 of 50 steps
