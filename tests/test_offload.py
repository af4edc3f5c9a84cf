"""Offload with prefetch (``cache.offload=true cache.prefetch=true``): the module order is learned, the next
module's factors are requested ahead, stale copies are never used, values are exact. On a CPU the copies
are immediate; a copying backend stands in for the host link so a stale or misrouted copy would show.
"""

from __future__ import annotations

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.core.offload import Copies

pytestmark = pytest.mark.usefixtures("one_thread")


class Chain(torch.nn.Module):
    """Three cached modules in a row; module ``i`` returns a smooth function of the step, different per module.
    The output stacks all three (a copy: an order-0 forecast is the stored buffer itself)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (_Stage(i) for i in range(3))

    def forward(self, x, t):
        ya = self.a(x, t)
        yb = self.b(ya, t)
        return torch.stack([ya, yb, self.c(yb, t)])  # every module's output is checked


class _Stage(torch.nn.Module):
    def __init__(self, i):
        super().__init__()
        self.i = i

    def forward(self, x, t):
        s = float(t)
        return x + torch.sin(torch.arange(24.0).view(2, 3, 4) * (self.i + 1) + 0.1 * s) * (1 + 0.05 * s * s)


class CloneCopies(Copies):
    """A host link with its own memory: every fetch and store is a copy (as CUDA's are)."""

    def fetch(self, factors, device):
        return [_clone(f) for f in factors], None

    def store(self, factors, spares, to_host):
        return [_clone(f) for f in factors]


def _clone(f):
    from taylorseer.core.store import ScaledFactor

    if isinstance(f, ScaledFactor):
        return ScaledFactor(f.data.clone(), f.scale.clone(), f.dtype)
    return f.clone()


def _sample(config, steps=10, copies=None):
    model = Chain()
    cache = taylorseer.apply(model, config, modules=["a", "b", "c"], num_steps=steps)
    if copies is not None:
        cache.prefetcher._copies = copies
    outs = [model(torch.zeros(2, 3, 4), torch.tensor(float(s))) for s in range(steps)]
    return outs, cache


@pytest.mark.parametrize("store", ["dense", "float8"])
def test_prefetched_factors_give_the_same_values_bit_for_bit(store):
    base = dict(interval=3, max_order=1, first_enhance=1, factor_store=store)
    reference, _ = _sample(CacheConfig(**base))
    offloaded, _ = _sample(CacheConfig(**base, offload=True))
    prefetched, cache = _sample(CacheConfig(**base, offload=True, prefetch=True), copies=CloneCopies())
    assert reference[2].abs().sum() > 0
    for outs in (offloaded, prefetched):
        assert all(torch.equal(x, y) for x, y in zip(reference, outs, strict=True))
    assert cache.prefetcher.stats.hits > 0


def test_the_module_order_is_learned_and_each_next_module_prefetched():
    # Full steps 0, 3, 6, 9 and forecast steps 1, 2, 4, 5, 7, 8; modules a -> b -> c.
    # Updates: step 0 stores (nothing to fetch, the order is learned); step 3: a is a miss, b and c hits, and
    # c requests a for step 6 (the last -> first transition); steps 6 and 9: three hits each.
    # Forecasts: step 1 three misses (order unknown); step 2: a misses, b and c hit, c requests a for step 3,
    # which is a full step: that copy is dropped (wasted) when a updates; the same after steps 5 and 8;
    # steps 4 and 7: a misses (its copy was dropped), then hits; step 5 and 8: three hits.
    _, cache = _sample(CacheConfig(interval=3, max_order=1, first_enhance=1, offload=True, prefetch=True),
                       copies=CloneCopies())
    stats = cache.prefetcher.stats
    assert (stats.hits, stats.misses, stats.wasted) == (8 + 12, 1 + 6, 3)
    factor = 2 * 3 * 4 * 4  # one fp32 factor of one module
    # To the device, every request (a miss or a prefetch, used or dropped) moves the module's factors then:
    # one factor each until the module's update at step 3, two after it.
    updates = (1 + 1 + 1 + 2) + 3 * 2 + 3 * 2  # step 3: a (miss), b, c, then a for step 6; steps 6 and 9
    forecasts = 3 + 4 * 1 + 4 * 2 + 3 * 2 + 4 * 2 + 3 * 2  # steps 1, 2, 4, 5, 7, 8
    assert stats.bytes_to_device == (updates + forecasts) * factor
    # to the host: every update stores its factors (1 at step 0, then 2)
    assert stats.bytes_to_host == (1 * 3 + 2 * 3 * 3) * factor
    cache.end_call()  # the copy c requested for the next call is dropped with the call's factors
    assert stats.wasted == 4


def test_stale_copies_are_never_used():
    # A copy requested before the module's next update holds the old factors: it must be dropped.
    from taylorseer.core.offload import Prefetcher

    class Broken(Prefetcher):  # what a prefetcher that kept and trusted every pending copy would give
        def _drop(self, track, names):
            pass

        def take(self, context, kind, name, states, lookup):
            track = self._tracks.get((context, kind))
            if track is not None and name in track.pending:
                track.pending[name].sources = [s.tensors for s in states]  # pretend it is fresh
            return super().take(context, kind, name, states, lookup)

    config = CacheConfig(interval=3, max_order=1, first_enhance=1, offload=True, prefetch=True)
    reference, _ = _sample(CacheConfig(interval=3, max_order=1, first_enhance=1))
    model = Chain()
    cache = taylorseer.apply(model, config, modules=["a", "b", "c"], num_steps=10)
    cache.prefetcher = Broken(CloneCopies())
    outs = [model(torch.zeros(2, 3, 4), torch.tensor(float(s))) for s in range(10)]
    assert not all(torch.equal(x, y) for x, y in zip(reference, outs, strict=True))  # the test can see it


def test_cond_and_uncond_contexts_prefetch_apart():
    config = CacheConfig(interval=3, max_order=1, first_enhance=1, offload=True, prefetch=True)
    reference = CacheConfig(interval=3, max_order=1, first_enhance=1)
    outs = {}
    for name, cfg in (("ref", reference), ("pre", config)):
        model = Chain()
        cache = taylorseer.apply(model, cfg, modules=["a", "b", "c"], num_steps=10)
        if cfg.prefetch:
            cache.prefetcher._copies = CloneCopies()
        outs[name] = []
        for s in range(10):
            for ctx, scale in (("cond", 1.0), ("uncond", -2.0)):
                with cache.context(ctx):
                    outs[name].append(model(torch.full((2, 3, 4), scale), torch.tensor(float(s))))
    assert all(torch.equal(x, y) for x, y in zip(outs["ref"], outs["pre"], strict=True))


def test_prefetch_needs_offload():
    with pytest.raises(ValueError, match="cache.prefetch=true prefetches offloaded factors: set cache.offload=true"):
        CacheConfig(prefetch=True)
    assert CacheConfig(offload=True, prefetch=True).tag == CacheConfig().tag  # same outputs, same run folder


def test_prefetch_and_offload_do_not_change_a_run_folders_identity():
    from taylorseer.harness.runfolder import identity

    base = {"cache": CacheConfig().to_dict()}
    moved = {"cache": CacheConfig(offload=True, prefetch=True).to_dict()}
    assert identity(base) == identity(moved)
    assert identity(base) != identity({"cache": CacheConfig(factor_store="float8").to_dict()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("store", ["dense", "float8"])
def test_prefetch_on_cuda_is_exact(store):
    """On a GPU: side-stream copies into pinned memory give the on-device cache's values bit for bit."""
    base = dict(interval=3, max_order=2, first_enhance=1, factor_store=store, factor_dtype="bfloat16")

    def run(config):
        model = Chain().cuda()
        cache = taylorseer.apply(model, config, modules=["a", "b", "c"], num_steps=20)
        outs = [model(torch.zeros(2, 3, 4, device="cuda"), torch.tensor(float(s))) for s in range(20)]
        torch.cuda.synchronize()
        return outs, cache

    reference, _ = run(CacheConfig(**base))
    prefetched, cache = run(CacheConfig(**base, offload=True, prefetch=True))
    assert all(torch.equal(x, y) for x, y in zip(reference, prefetched, strict=True))
    assert cache.prefetcher.stats.hits > cache.prefetcher.stats.misses
    assert all(t.device.type == "cpu" and t.is_pinned()
               for states in cache._ctx.states.values() for s in states
               for f in s.tensors for t in ((f.data, f.scale) if hasattr(f, "scale") else (f,)))
