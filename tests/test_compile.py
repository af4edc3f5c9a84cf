"""taylorseer.compile: the cached transformer compiled gives the eager output (1e-4), and the number of
compilations depends on block classes and shapes only, never on the steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.core import kernels as fused
from taylorseer.perf.compile import compile as ts_compile
from taylorseer.perf.compile import graph_count, repeated_blocks, uncompile

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not fused._has_cxx(), reason="inductor's CPU code needs a C++ compiler")]


def _flux():
    from diffusers import FluxTransformer2DModel
    from tiny_flux import TINY_TRANSFORMER

    from taylorseer_flux.flops import transformer_inputs

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER).eval()
    return model, transformer_inputs(TINY_TRANSFORMER, 64, 16, device="cpu")


def _euler(model, inputs, steps):
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            with model.cache_context("cond"):
                v = model(**{**inputs, "hidden_states": x, "timestep": sigmas[i].expand(1)})[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    model._reset_stateful_cache()
    return x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_flux_cached_compiled_equals_eager_and_compiles_once_per_class_and_shape():
    from taylorseer_flux.cache import attach_cache

    model, inputs = _flux()
    config = CacheConfig(interval=3, max_order=2, first_enhance=2)
    attach_cache(model, config, 12)
    eager = _euler(model, inputs, 12)
    report = ts_compile(model)
    # The cache's parts: double blocks' attn and ff compiled inside the cache's full-step call; norms and the
    # single blocks' attention as plain children. The blocks' own (override) forwards stay eager.
    assert report.cached_parts == 4 and report.classes == ["AdaLayerNormZero", "AdaLayerNormZeroSingle",
                                                           "FeedForward", "FluxAttention"]
    torch._dynamo.reset()
    start = graph_count()
    compiled = _euler(model, inputs, 12)
    first = graph_count() - start
    assert _rel(compiled, eager) < 1e-4
    assert torch.equal(_euler(model, inputs, 12), compiled)  # a second call: no new graph, same output
    assert graph_count() - start == first
    # Twice the steps: the same graphs (nothing compiled depends on the step).
    torch._dynamo.reset()
    start = graph_count()
    taylorseer.get_cache(model).reset(num_steps=24)  # a call longer than the cache's num_steps is an error
    _euler(model, inputs, 24)
    assert graph_count() - start == first <= 8  # 4 classes x (image / text or joint / single token counts)
    uncompile(model)
    assert torch.equal(_euler(model, inputs, 12), eager)  # the eager cached model again, bit for bit
    taylorseer.remove(model)
    assert taylorseer.get_cache(model) is None
    assert not any("forward" in m.__dict__ for _, m in model.named_modules() if _)  # diffusers' hook keeps the root's


def test_uncached_model_compiles_its_blocks_whole():
    model, inputs = _flux()
    eager = _euler(model, inputs, 4)
    report = ts_compile(model)
    assert report.regions == [f"transformer_blocks.{i}" for i in range(2)] + [
        f"single_transformer_blocks.{i}" for i in range(2)]
    assert _rel(_euler(model, inputs, 4), eager) < 1e-4
    uncompile(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_dit_cached_compiled_sampling():
    from taylorseer_dit.cache import attach_cache
    from taylorseer_dit.diffusion import GaussianDiffusion
    from taylorseer_dit.models import DiT_models
    from taylorseer_dit.pipeline import sample

    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10, in_channels=4).eval()
    model.initialize_weights(zero_init=False)
    assert len(repeated_blocks(model)) == 2
    diffusion = GaussianDiffusion(20, "ddim")
    labels = torch.tensor([1, 2])
    attach_cache(model, CacheConfig(interval=4, max_order=1, first_enhance=2), 20)
    eager = sample(model, diffusion, labels, 1.5, seed=0)
    report = ts_compile(model)
    assert report.cached_parts == 4  # attn and mlp of both blocks, computed by the cache on full steps
    torch._dynamo.reset()
    start = graph_count()
    compiled = sample(model, diffusion, labels, 1.5, seed=0)
    first = graph_count() - start
    sample(model, diffusion, labels, 1.5, seed=0)
    assert graph_count() - start == first <= 4
    assert _rel(compiled, eager) < 1e-4
