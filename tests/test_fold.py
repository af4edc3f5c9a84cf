"""Folded records of the collapsed forecast step (taylorseer.attach.fold): a run's branches whose gates share their
time-varying part are recorded as a few sums; the forecast is the per-branch one up to float rounding."""

from __future__ import annotations

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import families
from taylorseer.attach.hooks import remove

FOLDING = ("wan", "pixart", "sana", "ltx", "flux2")


def _run(case, config, steps=20, fold=True, monkeypatch=None, calls=1):
    monkeypatch.setenv("TAYLORSEER_FOLD", "1" if fold else "0")
    cache = families.apply_preset(case.model, config, steps)
    try:
        outs = [families.sample(case, steps) for _ in range(calls)]
        return outs, cache.nbytes(), cache.collapser.folder.folded_runs, cache.collapser.heads
    finally:
        remove(case.model)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", FOLDING)
def test_a_folded_run_forecasts_what_its_branches_forecast(name, order, monkeypatch):
    case = families.bench_case(name, "smoke")
    config = CacheConfig(interval=5, max_order=order, first_enhance=2)
    (folded,), folded_bytes, runs, heads = _run(case, config, monkeypatch=monkeypatch)
    (per_branch,), per_branch_bytes, none, _ = _run(case, config, fold=False, monkeypatch=monkeypatch)
    assert runs > 0 and none == 0 and heads > 0
    scale = per_branch.abs().max()
    assert (folded - per_branch).abs().max() <= 1e-5 * scale
    assert not torch.equal(folded, per_branch)  # really another path (sums, not branches)
    assert folded_bytes < per_branch_bytes


def test_sana_keeps_five_features_per_run_instead_of_three_per_block(monkeypatch):
    """Two blocks of three branches (self-attention and feed-forward gated by table rows 2 and 5, cross-attention
    ungated): the cross-attention sum, and per row the table-weighted and the plain sum, O + 1 factors each."""
    case = families.bench_case("sana", "smoke")
    config = CacheConfig(interval=5, max_order=1, first_enhance=2)
    _, folded_bytes, _, _ = _run(case, config, monkeypatch=monkeypatch)
    _, per_branch_bytes, _, _ = _run(case, config, fold=False, monkeypatch=monkeypatch)
    blocks = len(case.model.transformer_blocks)
    assert blocks == 2 and folded_bytes * (3 * blocks) == per_branch_bytes * 5


def test_bf16_factors_do_not_fold_table_gates(monkeypatch):
    """P + e Q cancels where a gate is near zero: table gates fold with fp32 factors only."""
    case = families.bench_case("sana", "smoke")
    config = CacheConfig(interval=5, max_order=1, first_enhance=2, factor_dtype="bfloat16")
    (out,), _, runs, heads = _run(case, config, monkeypatch=monkeypatch)
    assert runs == 0 and heads > 0 and torch.isfinite(out).all()


def test_a_second_call_starts_afresh(monkeypatch):
    case = families.bench_case("wan", "smoke")
    (first, second), _, runs, _ = _run(case, CacheConfig(interval=4, max_order=2, first_enhance=1),
                                       monkeypatch=monkeypatch, calls=2)
    assert runs > 0 and torch.equal(first, second)


@pytest.mark.parametrize("forecaster", ["newton", "hermite", "feedback"])
def test_every_forecaster_folds(forecaster, monkeypatch):
    case = families.bench_case("pixart", "smoke")
    config = CacheConfig(interval=4, max_order=2, first_enhance=2, forecaster=forecaster)
    (folded,), _, runs, _ = _run(case, config, monkeypatch=monkeypatch)
    (per_branch,), _, _, _ = _run(case, config, fold=False, monkeypatch=monkeypatch)
    assert runs > 0 and (folded - per_branch).abs().max() <= 1e-5 * per_branch.abs().max()


def test_work_between_blocks_splits_the_folded_runs(monkeypatch):
    """A forward hook that changes a block's output breaks the run there: two folded runs, the hook's work kept."""
    case = families.bench_case("wan", "smoke")
    config = CacheConfig(interval=5, max_order=1, first_enhance=2)
    handle = case.model.blocks[0].register_forward_hook(lambda _m, _a, out: out * 0.5)
    try:
        (folded,), _, runs, heads = _run(case, config, monkeypatch=monkeypatch)
        (per_branch,), _, _, _ = _run(case, config, fold=False, monkeypatch=monkeypatch)
    finally:
        handle.remove()
    full_steps = 20 - heads // 2  # each forecast step computes two runs (one block each)
    assert runs == 2 * full_steps
    assert (folded - per_branch).abs().max() <= 1e-5 * per_branch.abs().max()


def test_interval_one_folds_nothing_and_equals_uncached(monkeypatch):
    case = families.bench_case("sana", "smoke")
    uncached = families.sample(case, 6)
    (out,), _, runs, _ = _run(case, CacheConfig(interval=1, max_order=1, first_enhance=1), steps=6,
                              monkeypatch=monkeypatch)
    assert runs == 0 and torch.equal(out, uncached)


def test_sums_are_computed_in_the_records_own_slots(monkeypatch):
    """After its first records a run's sums start in the slot its factor update stores them in: no copy, no new
    tensor per full step."""
    from taylorseer.core.cache import ForecastCache

    hits, misses = [], []
    spare = ForecastCache.spare

    def counted(self, name, index, like):
        out = spare(self, name, index, like)
        (hits if out is not None else misses).append(name)
        return out

    monkeypatch.setattr(ForecastCache, "spare", counted)
    case = families.bench_case("sana", "smoke")
    _run(case, CacheConfig(interval=5, max_order=1, first_enhance=2), monkeypatch=monkeypatch)
    # 5 full steps (0, 1, 6, 11, 16) x 5 sums: the first step has no record, the second's order-0 record has no
    # spare slot yet (its one factor is read by the update); from the third on every sum is in place.
    assert len(hits) == 3 * 5 and len(misses) == 5


def test_the_summary_says_which_blocks_fold(monkeypatch):
    case = families.bench_case("sana", "smoke")
    monkeypatch.setenv("TAYLORSEER_FOLD", "1")
    families.apply_preset(case.model, CacheConfig(interval=5, max_order=1, first_enhance=2), 8)
    try:
        families.sample(case, 8)
        text = taylorseer.summary(case.model).describe()
    finally:
        remove(case.model)
    assert "2 blocks fold their branches" in text and "runs recorded so" in text


@pytest.mark.parametrize("name", ["sana", "wan"])
def test_calls_of_other_sizes_and_batches_fold_afresh(name, monkeypatch):
    """A second sampling call at another resolution and batch (new token count, CFG on): new records, new slots;
    each call equals a fresh attachment's."""
    monkeypatch.setenv("TAYLORSEER_FOLD", "1")
    model = families.build(name, "smoke")
    small = families.BenchCase(name, model, families.inputs(name, model, height=32, width=32, text_tokens=8))
    large = families.BenchCase(name, model, families.inputs(name, model, batch=2, height=64, width=32,
                                                             text_tokens=8))
    config = CacheConfig(interval=4, max_order=1, first_enhance=1)
    cache = families.apply_preset(model, config, 12)
    try:
        together = [families.sample(case, 12) for case in (small, large, small)]
        assert cache.collapser.folder.folded_runs > 0
    finally:
        remove(model)
    for case, out in zip((small, large), together, strict=False):
        families.apply_preset(model, config, 12)
        try:
            assert torch.equal(families.sample(case, 12), out)
        finally:
            remove(model)
    assert torch.equal(together[0], together[2])


def test_a_bad_fold_setting_is_refused_with_the_choices(monkeypatch):
    case = families.bench_case("sana", "smoke")
    monkeypatch.setenv("TAYLORSEER_FOLD", "off")
    with pytest.raises(ValueError, match="TAYLORSEER_FOLD='off' is not a setting: expected 1 .* or 0"):
        families.apply_preset(case.model, CacheConfig(interval=5, max_order=1, first_enhance=2), 8)
    assert taylorseer.summary(case.model) is None  # refused before anything was wrapped


def test_a_call_killed_inside_a_folded_run_leaves_nothing_behind(monkeypatch):
    """Interrupted on a full step between the run's blocks (its sums half made), then reset and run again: the
    same latent as a fresh attachment's, bit for bit."""
    monkeypatch.setenv("TAYLORSEER_FOLD", "1")
    case = families.bench_case("wan", "smoke")
    config = CacheConfig(interval=5, max_order=2, first_enhance=2)
    (fresh,), _, _, _ = _run(case, config, monkeypatch=monkeypatch)
    cache = families.apply_preset(case.model, config, 20)
    calls = []

    def kill(_module, _args, _kwargs):
        calls.append(1)
        if len(calls) == 12:  # step 11, a full step: the first block has folded, the second is next
            raise KeyboardInterrupt

    handle = case.model.blocks[1].register_forward_pre_hook(kill, with_kwargs=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            families.sample(case, 20)
        handle.remove()
        cache.reset(num_steps=20)
        assert torch.equal(families.sample(case, 20), fresh)
    finally:
        handle.remove()
        remove(case.model)


def test_two_models_sampled_in_alternation_each_fold_their_own(monkeypatch):
    monkeypatch.setenv("TAYLORSEER_FOLD", "1")
    config = CacheConfig(interval=4, max_order=1, first_enhance=1)
    cases = [families.bench_case("sana", "smoke"), families.bench_case("sana", "smoke", seed=1)]
    alone = [_run(case, config, steps=12, monkeypatch=monkeypatch)[0][0] for case in cases]
    for case in cases:
        families.apply_preset(case.model, config, 12)
    try:
        xs = [case.inputs["hidden_states"].clone() for case in cases]
        loop = families.loop_of("sana")
        for i in range(12):  # one step of each in turn, as two runs sharing a process would
            for k, case in enumerate(cases):
                t = torch.full((1,), loop.timestep(1 - i / 12))
                with torch.no_grad():
                    v = case(hidden_states=xs[k], timestep=t)[0]
                xs[k] = xs[k] - v / (loop.sign * 12)
    finally:
        for case in cases:
            remove(case.model)
    for x, ref in zip(xs, alone, strict=True):
        assert torch.equal(x, ref)
