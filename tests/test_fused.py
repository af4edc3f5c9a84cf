"""The one-pass forecast kernels: same values as the addcmul chain, one compile for every step's
weights, the bytes a forecast moves, the fallback, and the cache-off path's ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import taylorseer
from taylorseer import CacheConfig
from taylorseer.core import kernels as fused
from taylorseer.core.kernels import gated_add

ROOT = Path(__file__).resolve().parents[1]
needs_cxx = pytest.mark.skipif(not fused._has_cxx(), reason="inductor's CPU kernels need a C++ compiler")


class OpLog(TorchDispatchMode):
    """Every aten op that runs, with the bytes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _operands(n, dtype=torch.float32, tokens=64, sliced=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(2, tokens, 32, generator=g).to(dtype)
    gate = torch.randn(2, 1, 32, generator=g).to(dtype)
    factors = [torch.randn(2, tokens + (8 if sliced else 0), 32, generator=g).to(dtype) for _ in range(n)]
    if sliced:  # HunyuanVideo's single blocks hand out token slices of one stored branch
        factors = [f[:, :tokens] for f in factors]
    weights = [1.0, 2.5, 3.125, -0.75, 0.5][:n]
    return residual, gate, list(zip(weights, factors, strict=True))


@needs_cxx
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliced", [False, True])
def test_inductor_kernel_equals_the_addcmul_chain(one_thread, n, dtype, sliced):
    residual, gate, terms = _operands(n, dtype, sliced=sliced)
    reference = fused.addcmul_chain(residual, gate, terms)
    with fused.forecast_kernel("inductor"):
        out = gated_add(residual, gate, terms)
        # Into a buffer that holds the residual already (a block's second branch): in place, returned.
        buffer = residual.clone()
        into = gated_add(residual, gate, terms, out=buffer)
    assert into is buffer and out.dtype == dtype and out.shape == residual.shape
    assert torch.equal(into, out)
    # Against the exact value: the fused kernel rounds once (at its store), the chain once per factor.
    exact = residual.double() + gate.double() * sum(c * f.double() for c, f in terms)
    fused_error, chain_error = (out.double() - exact).abs().max(), (reference.double() - exact).abs().max()
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference, rtol=2e-6, atol=2e-6)  # float rounding only
    assert fused_error <= chain_error * 1.01 + 1e-6
    assert not torch.equal(out, residual)


@needs_cxx
def test_new_weights_every_step_reuse_one_compiled_kernel(one_thread):
    from torch._dynamo.utils import counters

    residual, gate, terms = _operands(2, seed=3)
    factors = [f for _, f in terms]
    with fused.forecast_kernel("inductor"):
        gated_add(residual, gate, terms)  # compiles (or loads from inductor's cache)
        before = counters["stats"]["unique_graphs"]
        for k in range(1, 12):  # the Taylor weights of 11 different forecast distances
            out = gated_add(residual, gate, [(1.0, factors[0]), (float(k), factors[1])])
            torch.testing.assert_close(out, residual + gate * (factors[0] + k * factors[1]), rtol=1e-5, atol=1e-5)
        # Another token count reuses the shape-generic kernel too.
        r2, g2, t2 = _operands(2, tokens=40, seed=4)
        gated_add(r2, g2, t2)
    assert counters["stats"]["unique_graphs"] == before


def test_kernel_choice_per_device_and_size():
    big, small = fused.CPU_FUSE_MIN_NUMEL, fused.CPU_FUSE_MIN_NUMEL - 1
    cpu = torch.device("cpu")
    expected_cpu = "inductor" if fused._has_cxx() else "addcmul"
    assert fused.resolve_kernel(cpu, "auto", numel=big) == expected_cpu
    assert fused.resolve_kernel(cpu, "auto", numel=small) == "addcmul"  # the compiled call's fixed cost wins
    assert fused.resolve_kernel(cpu, "triton") == "addcmul"  # Triton is CUDA-only
    cuda = torch.device("cuda")
    assert fused.resolve_kernel(cuda, "auto") == "addcmul"  # launch-bound on a GPU: measured on an H100
    assert fused.resolve_kernel(cuda, "triton") == "triton"
    assert fused.resolve_kernel(torch.device("meta"), "auto") == "addcmul"
    with pytest.raises(ValueError, match=r"forecast kernel 'cuda' is unknown: expected one of \['auto', "):
        fused.set_forecast_kernel("cuda")


def test_a_failing_kernel_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(fused._FUSED, "inductor", broken)
    monkeypatch.setattr(fused, "_broken", set())
    residual, gate, terms = _operands(2)
    with fused.forecast_kernel("inductor"):
        with pytest.warns(RuntimeWarning, match=r"'inductor' forecast kernel failed on cpu.*no compiler here"):
            out = gated_add(residual, gate, terms)
        assert torch.equal(out, fused.addcmul_chain(residual, gate, terms))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gated_add(residual, gate, terms)  # no second warning: the chain from now on
        assert fused.resolve_kernel(torch.device("cpu"), numel=1 << 20) == "addcmul"


@pytest.mark.parametrize("kernel, passes", [("addcmul", 12), pytest.param("inductor", 8, marks=needs_cxx)])
def test_bytes_a_forecast_moves_per_factor(one_thread, kernel, passes):
    # A DiT block at order 1: x + g1 (F0a + k F1a) + g2 (F0m + k F1m): two gated adds over 4 factors.
    residual, gate, attn = _operands(2, tokens=256)
    _, gate2, mlp = _operands(2, tokens=256, seed=1)
    with fused.forecast_kernel(kernel), fused.count_traffic() as records:
        out = gated_add(residual, gate, attn)
        out = gated_add(residual, gate2, mlp, out=out)
    assert [r.kernel for r in records] == [kernel, kernel] and [r.num_factors for r in records] == [2, 2]
    tensor, row = residual.numel() * 4, gate.numel() * 4
    gate_reads = 4 if kernel == "addcmul" else 2  # the chain reads the gate once per factor
    assert sum(r.bytes_moved for r in records) == passes * tensor + gate_reads * row
    # Per factor: the chain 3 tensor passes (read acc, read factor, write acc), fused 2 (O + 3 per add).
    assert passes / 4 == {"addcmul": 3, "inductor": 2}[kernel]
    torch.testing.assert_close(out, residual + gate * (attn[0][1] + 2.5 * attn[1][1])
                               + gate2 * (mlp[0][1] + 2.5 * mlp[1][1]), rtol=1e-5, atol=1e-5)


def test_the_chain_is_one_addcmul_per_factor():
    residual, gate, terms = _operands(3)
    with OpLog() as log:
        fused.addcmul_chain(residual, gate, terms)
    assert log.ops == ["addcmul", "addcmul_", "addcmul_"]


def test_triton_kernel_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    # Triton's interpreter runs the real kernel on CPU tensors (the GPU script runs it on the device).
    code = textwrap.dedent("""
        import torch
        from taylorseer.core import kernels as fused
        g = torch.Generator().manual_seed(0)
        for n, sliced in [(1, False), (2, False), (3, True), (5, False)]:
            res = torch.randn(2, 12, 40, generator=g)
            gate = torch.randn(2, 1, 40, generator=g)
            fs = [torch.randn(2, 16, 40, generator=g)[:, 4:] if sliced else torch.randn(2, 12, 40, generator=g)
                  for _ in range(n)]
            terms = list(zip([1.0, 0.5, 0.25, -2.0, 3.0][:n], fs))
            ref = fused.addcmul_chain(res, gate, terms)
            out = fused.triton_gated_add(res, gate, terms)
            into = res.clone()
            fused.triton_gated_add(res, gate, terms, out=into)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(into, ref, rtol=1e-5, atol=1e-5)
            bcast = gate[:1]  # one gate row for the whole batch
            torch.testing.assert_close(fused.triton_gated_add(res, bcast, terms),
                                       fused.addcmul_chain(res, bcast, terms), rtol=1e-5, atol=1e-5)
        print("triton-ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "triton-ok" in result.stdout, result.stderr[-3000:]


def _tiny_dit():
    from taylorseer_dit.models import DiT_models

    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10, in_channels=4).eval()
    model.initialize_weights(zero_init=False)
    return model


def _ops_of_a_run(model, steps=6):
    x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2])
    with torch.no_grad(), OpLog() as log:
        for s in range(steps):
            x = 0.9 * x + 0.1 * model(x, torch.full((2,), 900 - 100 * s), y)[:, :4]
    return log.ops, x


def test_cache_off_runs_exactly_the_ops_of_the_plain_model():
    from taylorseer_dit.cache import attach_cache

    model = _tiny_dit()
    plain_ops, plain = _ops_of_a_run(model)
    cache = attach_cache(model, CacheConfig(interval=4, max_order=2, enabled=False), 6)
    off_ops, off = _ops_of_a_run(model)
    assert off_ops == plain_ops and torch.equal(off, plain)  # not one extra op: only the Python step counter
    assert [r.step for r in cache.history] == list(range(6))
    taylorseer.remove(model)
    # Interval 1 computes every step too, and records the factors it would forecast from: the extra
    # ops are the recording's (copy + differences), counted here for docs/performance.md.
    attach_cache(model, CacheConfig(interval=1, max_order=1, first_enhance=2), 6)
    one_ops, one = _ops_of_a_run(model)
    assert torch.equal(one, plain)
    # 4 cached modules (2 blocks x attn, mlp), 6 steps: steps 0-1 allocate each buffer once (_to_copy),
    # steps 2-5 copy into the retired one; from step 1 on one sub_ + div_ forms the first difference.
    assert Counter(one_ops) - Counter(plain_ops) == Counter(_to_copy=8, copy_=16, sub_=20, div_=20)
    assert len(one_ops) - len(plain_ops) == 64  # 2.7 elementwise ops per module and step; no matmul, no alloc
