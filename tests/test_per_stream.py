"""The memory-light forecast step (cache.forecast_step=per_stream): the factors of each residual stream's total
update over a run of blocks instead of each branch's, and a forecast step that is one fused add.

Exact where the stream's update is a polynomial the forecaster reproduces (even when no branch is); one factor set
per stream and run (bytes counted); interval 1 bit-identical to no cache; a run split by work between blocks gives
the same samples (every forecaster is linear in its factors); the adaptive schedule's probe block, short=False
blocks, 8-bit and offloaded factors; the state of one sampling call never reaches the next.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig, presets
from taylorseer.attach import families
from taylorseer.attach.blocks import BlockSpec, Branch, LinearGate

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 12


# ------------------------------------------------------------------------------------- a polynomial stream
class _Poly(torch.nn.Module):
    """A branch whose output is ``f(t)`` at step ``t`` (broadcast over the input's batch and tokens)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, t):
        return x * 0 + self.f(float(t))


class _Block(torch.nn.Module):
    """``x + g(c) * a(t) + b(t)``, the gate ``g(c) = c`` (rows 0..C-1 of ``mod``, an identity)."""

    def __init__(self, fa, fb, channels: int):
        super().__init__()
        self.a, self.b = _Poly(fa), _Poly(fb)
        self.mod = torch.nn.Linear(channels, 2 * channels)
        with torch.no_grad():
            self.mod.weight.zero_()
            self.mod.weight[:channels] = torch.eye(channels)
            self.mod.bias.zero_()

    def forward(self, x, c, t):
        return x + self.mod(c)[:, None, : x.shape[-1]] * self.a(x, t) + self.b(x, t)


class _Stack(torch.nn.Module):
    """Blocks whose stream update is a polynomial of degree ``degree`` in the step though no branch is: the gate is
    ``1 / (t + 1)``, the gated branch ``(t + 1) p(t)`` (degree + 1) and the ungated one a polynomial."""

    def __init__(self, degree: int, depth: int = 3, channels: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(degree)
        blocks = []
        for _ in range(depth):
            a, b = torch.randn(degree + 1, channels, generator=g), torch.randn(degree + 1, channels, generator=g)
            blocks.append(_Block(lambda t, a=a: (t + 1) * sum(c * t**i for i, c in enumerate(a)),
                                 lambda t, b=b: sum(c * t**i for i, c in enumerate(b)), channels))
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, t):
        c = torch.ones(x.shape[0], x.shape[-1]) / (float(t) + 1)
        for block in self.blocks:
            x = block(x, c, t)
        return x


def _spec(_block):
    gate = LinearGate("mod", 0, 2, input="c", activation=None)
    return BlockSpec((Branch("a", gate, into="x"), Branch("b", into="x")), returns="x")


def _poly_run(model, config):
    cache = taylorseer.apply(model, config, blocks={"blocks": _spec}, num_steps=STEPS)
    x = torch.zeros(2, 4, 8)
    try:
        with torch.no_grad():
            return torch.stack([model(x, torch.tensor(float(t))) for t in range(STEPS)]), cache
    finally:
        taylorseer.remove(model)


@pytest.mark.parametrize("forecaster,order", [("taylor", 1), ("newton", 2)])
def test_a_polynomial_stream_update_is_forecast_exactly(forecaster, order):
    model = _Stack(degree=order)
    with torch.no_grad():
        exact = torch.stack([model(torch.zeros(2, 4, 8), torch.tensor(float(t))) for t in range(STEPS)])
    config = CacheConfig(interval=3, max_order=order, first_enhance=1, forecaster=forecaster)
    per_stream, cache = _poly_run(model, dataclasses.replace(config, forecast_step="per_stream"))
    per_branch, _ = _poly_run(model, config)
    full = [r.step for r in cache.last_call.history if r.full]
    assert full == [0, 3, 6, 9] and cache.collapser.heads == STEPS - 4
    known = full[order] + 1  # from here on the factors hold O + 1 full steps: every order is formed
    scale = float(exact.abs().max())
    assert float((per_stream - exact)[known:].abs().max()) < 1e-5 * scale
    assert float((per_branch - exact)[known:].abs().max()) > 1e-2 * scale  # the gated branch: degree O + 1


# ---------------------------------------------------------------------------------------- preset models
def _loop(case, steps: int = STEPS) -> torch.Tensor:
    x = case.inputs["hidden_states"].clone()
    scale = 1.0 if case.family == "flux" else 1000.0
    channel_dim = 2 if case.family in ("cogvideox", "flux") else 1
    for i in range(steps):
        t = torch.full((x.shape[0],), (1 - i / steps) * scale, dtype=x.dtype)
        with torch.no_grad():
            v = case(hidden_states=x, timestep=t.long() if case.family == "cogvideox" else t)[0]
        x = x - v.narrow(channel_dim, 0, x.shape[channel_dim]).to(x.dtype) / steps
    return x


def _run(case, config, preset=None, calls: int = 1):
    preset = preset or presets.get(families.family_of(case.model))
    cache = taylorseer.apply(case.model, config, preset=preset, num_steps=STEPS)
    try:
        outs = [_loop(case) for _ in range(calls)]
        summary = taylorseer.summary(case.model).describe()
    finally:
        taylorseer.remove(case.model)
    return (outs[0] if calls == 1 else outs), cache, summary


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


PS = CacheConfig(interval=3, max_order=1, first_enhance=1, forecast_step="per_stream")


def test_one_factor_set_per_stream_and_run_and_no_branch_factors(smoke_cases):
    case = smoke_cases("flux")  # 2 double + 2 single blocks, one run into the image stream
    out, cache, summary = _run(case, PS)
    per_branch, branch_cache, _ = _run(case, dataclasses.replace(PS, forecast_step="collapsed"))
    batch, tokens = case.inputs["hidden_states"].shape[:2]
    image_stream = batch * tokens * case.model.inner_dim * 4  # fp32
    assert cache.last_call.nbytes == (PS.max_order + 1) * image_stream == 2 * (2 * 64 * 32 * 4)
    # per branch: attn + ff of each double block, proj_out's image part of each single block
    assert branch_cache.last_call.nbytes == 6 * cache.last_call.nbytes
    assert len(cache.unrecorded) == 6 and cache.collapser.per_branch == {}
    full = sum(r.full for r in cache.last_call.history)
    assert cache.collapser.units_recorded == full and cache.collapser.heads == STEPS - full
    assert "4 blocks forecast from their runs' stream updates" in summary
    # Random weights, gates that change fast with the timestep: measured 5.4e-3 (per branch 1.7e-3). The bundled,
    # trained models measure the fidelity (test_digits_dit_per_stream_is_closer_to_uncached_than_fora).
    assert 1e-4 < _rel(out, _loop(case)) < 0.02 and _rel(per_branch, _loop(case)) > 1e-4


def test_interval_one_is_bit_identical_to_no_cache(smoke_cases):
    case = smoke_cases("sd3")
    out, cache, _ = _run(case, CacheConfig(interval=1, max_order=2, first_enhance=1, forecast_step="per_stream"))
    assert torch.equal(out, _loop(case)) and cache.collapser.heads == 0


def test_two_calls_in_a_row_are_the_same_and_state_does_not_leak(smoke_cases):
    case = smoke_cases("wan")
    (first, second), cache, _ = _run(case, PS, calls=2)
    assert torch.equal(first, second)
    fresh, _, _ = _run(case, PS)
    assert torch.equal(first, fresh)
    assert cache.nbytes() == 0  # remove() reset it; the call's factors were in its contexts only


def test_a_run_split_by_work_between_blocks_gives_the_same_samples(smoke_cases):
    # Every forecaster is linear in its factors, so two runs' updates forecast apart sum to the one run's forecast.
    case = smoke_cases("pixart")
    whole, cache, _ = _run(case, PS)
    handle = case.model.transformer_blocks[0].register_forward_hook(lambda _m, _i, out: out * 1.0)
    try:
        split, split_cache, _ = _run(case, PS)
    finally:
        handle.remove()
    forecasts = STEPS - sum(r.full for r in cache.last_call.history)
    assert cache.collapser.heads == forecasts and split_cache.collapser.heads == 2 * forecasts
    assert split_cache.last_call.nbytes == 2 * cache.last_call.nbytes
    assert _rel(split, whole) < 1e-6


@pytest.mark.parametrize("forecaster", ["newton", "hermite", "feedback"])
def test_every_forecaster_runs_per_stream(smoke_cases, forecaster):
    case = smoke_cases("flux")
    config = dataclasses.replace(PS, max_order=2, forecaster=forecaster)
    out, cache, _ = _run(case, config)
    assert cache.collapser.heads > 0 and torch.isfinite(out).all()
    assert _rel(out, _loop(case)) < 0.05


def test_adaptive_probe_block_stays_per_branch(smoke_cases):
    case = smoke_cases("wan")
    config = dataclasses.replace(PS, interval=4, schedule="adaptive", threshold=0.5)
    out, cache, summary = _run(case, config)
    collapser = cache.collapser
    assert collapser.fixed == {"blocks.0"} and "blocks.0" in collapser.per_branch
    assert not any(k.startswith("blocks.0.") for k in cache.unrecorded)
    forecasts = sum(not r.full for r in cache.last_call.history)
    assert forecasts > 0 and collapser.heads == forecasts  # one run, blocks.1.., per forecast step
    assert "per branch (blocks.0: computed on every step" in summary
    assert _rel(out, _loop(case)) < 0.05


def test_short_false_blocks_keep_per_branch_factors(smoke_cases):
    # HunyuanVideo asked for by name keeps upstream's plain double blocks: they are forecast per branch, the
    # single blocks per stream (video and text, the two streams their branches add into).
    case = smoke_cases("hunyuan_video")
    out, cache, summary = _run(case, PS, preset=presets.get("hunyuan_video"))
    collapser = cache.collapser
    assert set(collapser.per_branch) == {"transformer_blocks.0", "transformer_blocks.1"}
    assert "short=False" in summary and collapser.heads > 0
    upstream, _, _ = _run(case, dataclasses.replace(PS, forecast_step="per_block"),
                          preset=presets.get("hunyuan_video"))
    assert _rel(out, _loop(case)) < 3 * _rel(upstream, _loop(case))
    found = taylorseer.apply(case.model, PS, num_steps=STEPS)  # found from the class: lean, every block one run
    taylorseer.remove(case.model)
    assert len(found.collapser.entries) == 4 and found.collapser.per_branch == {}


def test_forecast_step_kernels_at_full_size():
    """DiT-XL/2 on the meta device: the bound plus 7 at any depth: the pass counted as its eager formula (multiply,
    sum, add, cast: one compiled kernel on a device) and 3 tiny ops that put the O+1 weights on the device."""
    from taylorseer_eval import forecast_kernels

    full = forecast_kernels.count("dit-xl-2", order=1, variants=("collapsed", "per_stream", "bound"))
    half = forecast_kernels.count("dit-xl-2", order=1, depth=0.5, variants=("per_stream", "bound"))
    assert full == {"collapsed": 33, "per_stream": 32, "bound": 25}
    assert half["per_stream"] - half["bound"] == 7


@pytest.mark.parametrize("changes", [dict(factor_store="float8"), dict(offload=True)])
def test_8bit_and_offloaded_factors(smoke_cases, changes):
    case = smoke_cases("flux")
    dense, dense_cache, _ = _run(case, PS)
    out, cache, _ = _run(case, dataclasses.replace(PS, **changes))
    assert cache.collapser.heads == dense_cache.collapser.heads > 0
    if "offload" in changes:
        assert _rel(out, dense) < 1e-6 and cache.last_call.nbytes == dense_cache.last_call.nbytes
    else:  # fp8 with one fp32 scale per token: (C + 4) bytes of (4 C)
        assert cache.last_call.nbytes == dense_cache.last_call.nbytes * (32 + 4) // (4 * 32)
        assert _rel(out, dense) < 0.05 * _rel(dense, _loop(case)) + 1e-4


def test_tag_and_choices():
    assert CacheConfig(forecast_step="per_stream").tag == "N6-O1-W3-ps"
    assert CacheConfig().tag == "N6-O1-W3"
    assert CacheConfig.from_dict(PS.to_dict()).forecast_step == "per_stream"
    with pytest.raises(ValueError, match="per_stream"):
        CacheConfig(forecast_step="stream")


# ------------------------------------------------------------------------------------ the bundled models
def test_digits_dit_per_stream_is_closer_to_uncached_than_fora():
    """Bundled digits DiT, 20 samples, N=4 W=2: per stream O=1 far above FORA, near per branch O=1 (measured on 100
    samples in docs/memory.md), at a twelfth of the bytes."""
    from taylorseer_eval.fidelity import finite_mean, psnr
    from taylorseer_eval.store_fidelity import digits_sampler

    sample = digits_sampler(20)
    uncached, _ = sample(None)
    paper = CacheConfig(interval=4, max_order=1, first_enhance=2)
    stream, held = sample(dataclasses.replace(paper, forecast_step="per_stream"))
    branch, branch_held = sample(paper)
    fora, _ = sample(dataclasses.replace(paper, max_order=0))
    db = {k: finite_mean(psnr(v, uncached)) for k, v in (("stream", stream), ("branch", branch), ("fora", fora))}
    assert held == 2 * (2 * 20) * 16 * 128 * 4 and branch_held == 12 * held  # 6 blocks x 2 branches
    assert db["stream"] > db["fora"] + 3 and abs(db["stream"] - db["branch"]) < 1.5, db


def test_stream_fidelity_rows():
    from taylorseer_eval import stream_fidelity

    rows = stream_fidelity.main(["--models", "digits", "--samples", "10", "--schedules", "paper-O1", "--no-progress"])
    assert [(r["tag"], r["factors"]) for r in rows] == [("N4-O1-W2", "per branch"), ("N4-O1-W2-ps", "per stream")]
    assert rows[0]["cache_bytes"] == 12 * rows[1]["cache_bytes"] == 12 * 2 * 20 * 16 * 128 * 4
    assert all(r["psnr"] > 30 and 0 <= r["fid"] < 1 for r in rows)
