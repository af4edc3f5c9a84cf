"""One call, ``taylorseer.apply(pipe, config)``, on tiny offline Wan 2.1, SD3.5, PixArt-Sigma and CogVideoX pipelines.

Each pipeline is saved with ``save_pretrained`` and loaded back with ``from_pretrained``. The preset comes from the
transformer's class; the pipeline's own CFG runs (Wan: cond and uncond as separate calls in their own cache contexts;
the others: one batch of two).
"""

from __future__ import annotations

import pytest
import tiny_pipelines as tiny
import torch

import taylorseer
from taylorseer import CacheConfig
from taylorseer.attach import families
from taylorseer.perf.flops import count_flops
from taylorseer.perf.opcount import count_ops

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(tiny.CALLS)
STEPS = 20
PAPERISH = CacheConfig(interval=5, max_order=1, first_enhance=2)  # full steps 0, 1, 6, 11, 16
CONTEXTS = {"wan": ["cond", "uncond"], "sd3": ["default"], "pixart": ["default"], "cogvideox": ["cond_uncond"]}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    loaded = {}

    def get(name):
        if name not in loaded:
            folder = tiny.save(name, tmp_path_factory.mktemp(name))
            pipe = tiny.load(name, folder)
            loaded[name] = (pipe, tiny.run(pipe, name, STEPS))
        return loaded[name]

    yield get
    for pipe, _ in loaded.values():
        taylorseer.remove(pipe)


@pytest.fixture
def cached(pipes):
    attached = []

    def attach(name, config=PAPERISH, **kwargs):
        pipe, uncached = pipes(name)
        attached.append(pipe)
        return pipe, uncached, taylorseer.apply(pipe, config, **kwargs)

    yield attach
    for pipe in attached:
        taylorseer.remove(pipe)


@pytest.mark.parametrize("name", FAMILIES)
def test_interval_1_is_bit_identical(cached, name):
    pipe, uncached, cache = cached(name, CacheConfig(interval=1, first_enhance=1))
    out = tiny.run(pipe, name, STEPS)
    assert torch.equal(out, uncached)
    assert cache.last_call.full_steps() == {c: STEPS for c in CONTEXTS[name]}


@pytest.mark.parametrize("name", FAMILIES)
def test_schedule_and_a_fresh_state_for_every_pipeline_call(cached, name):
    pipe, uncached, cache = cached(name)
    first = tiny.run(pipe, name, STEPS)
    call = cache.last_call
    assert cache.nbytes() == 0 and call.nbytes > 0  # the call ended with the pipeline's loop
    for context in CONTEXTS[name]:
        records = [r for r in call.history if r.context == context]
        assert [r.step for r in records] == list(range(STEPS))
        assert [r.step for r in records if r.full] == [0, 1, 6, 11, 16]
    assert [r.context for r in call.history][: 2 * len(CONTEXTS[name])] == CONTEXTS[name] * 2
    assert 0 < (first - uncached).abs().max() < 0.5 * uncached.abs().max()  # forecasts, and close
    other = tiny.run(pipe, name, STEPS, prompt="a dog on the beach", seed=3)
    assert torch.equal(tiny.run(pipe, name, STEPS), first)  # no state carried over from the other call
    assert not torch.equal(other, first)
    assert cache.num_steps == STEPS  # the step count came from the pipeline
    tiny.run(pipe, name, 7)  # another step count in the next call: no error, its own schedule
    short = [r for r in cache.last_call.history if r.context == CONTEXTS[name][0]]
    assert [r.step for r in short if r.full] == [0, 1, 6] and len(short) == 7


@pytest.mark.parametrize("name", FAMILIES)
def test_cfg_keeps_cond_and_uncond_apart(cached, name):
    pipe, _, cache = cached(name)
    tiny.run(pipe, name, STEPS, guidance_scale=1.0)  # no CFG: one batch of one, one context
    single = cache.last_call
    tiny.run(pipe, name, STEPS)
    both = cache.last_call
    contexts = {r.context for r in single.history}
    assert len(contexts) == 1 and len(single.history) == STEPS
    # Wan runs uncond as a second call in its own context; the others batch cond and uncond: twice the
    # features either way, never mixed.
    assert both.nbytes == 2 * single.nbytes
    assert {r.context for r in both.history} == set(CONTEXTS[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_remove_restores_the_pipeline_exactly(cached, pipes, name):
    pipe, uncached, _ = cached(name)
    assert not torch.equal(tiny.run(pipe, name, STEPS), uncached)
    taylorseer.remove(pipe)
    model = pipe.transformer
    assert taylorseer.get_cache(pipe) is None and not model._forward_pre_hooks
    assert all("forward" not in m.__dict__ for m in model.modules() if m is not model)
    assert "forward" not in model.__dict__ or model.forward.__func__ is type(model).forward
    assert "progress_bar" not in pipe.__dict__
    assert torch.equal(tiny.run(pipe, name, STEPS), uncached)


# What a forecast step adds to the bound (every block skipped), O=1 (two factors per feature), per block: one
# kernel per distinct gate (Linear gates: the gate rows' addmm, plus one silu per block), one gated add per gated
# branch, one ungated add (two kernels) per ungated one. (gates, gated adds, ungated adds) per family:
# Wan/PixArt: 2 table gates, attn1 + ffn gated, attn2 ungated; SD3: block 0 has 3 gated branches (dual
# attention) and 1 silu + 3 gates, the others 2; CogVideoX: 1 silu + 2 Linear gates (norm1, norm2), 2 branches.
EXTRA = {"wan": [(2, 2, 1)] * 2, "pixart": [(2, 2, 1)] * 2, "sd3": [(1 + 3, 3, 0), (1 + 2, 2, 0), (1 + 2, 2, 0)],
         "cogvideox": [(1 + 2, 2, 0)] * 2}
FORBIDDEN = ("native_layer_norm", "layer_norm", "rms_norm", "_scaled_dot_product", "gelu", "bmm", "cat",
             "convolution", "softmax")


def _gated_add_kernels(shape) -> int:
    """Kernels of one gated add of two factors on a tensor of ``shape``, by whatever kernel gated_add picks here."""
    from taylorseer.core.kernels import gated_add

    x, f = torch.randn(shape), torch.randn(shape)
    gate = torch.randn(shape[0], 1, shape[-1])
    return count_ops(lambda: gated_add(x, gate, [(1.0, f), (2.0, f)])).kernels
PLAIN = families.PLAIN_MODULES  # the generic recipe (docs/any_model.md): the pre-gate branches by name


def _forecast_call(model, inputs, forecast_step="per_block", **apply_kwargs):
    """Ops and FLOPs of step 6 of a bare call loop: a forecast from two factors (full steps 0 and 5)."""
    config = CacheConfig(interval=5, max_order=1, first_enhance=1, forecast_step=forecast_step)
    taylorseer.apply(model, config, num_steps=STEPS, **apply_kwargs)
    try:
        with torch.no_grad():
            for _ in range(6):
                model(**inputs)
            ops = count_ops(lambda: model(**inputs))
            flops = count_flops(lambda: model(**inputs))  # step 7: a forecast too
    finally:
        taylorseer.remove(model)
    return ops, flops


@pytest.mark.parametrize("name", FAMILIES)
def test_a_forecast_step_runs_only_the_gates_and_the_residual_adds(pipes, name):
    pipe, _ = pipes(name)
    model = pipe.transformer
    frames = 2 if name in ("wan", "cogvideox") else 1
    inputs = families.inputs(name, model, batch=2, frames=frames, height=8, width=8, text_tokens=tiny.TEXT)
    ideal, ideal_flops = _forecast_call(model, inputs, skip_all=True)
    ours, flops = _forecast_call(model, inputs)
    plain, _ = _forecast_call(model, inputs, modules=PLAIN[name])
    shapes = []
    handle = model.get_submodule(next(iter(taylorseer.presets.find(model).blocks(model)))).register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape)),
        with_kwargs=True)
    with torch.no_grad():
        full = count_ops(lambda: model(**inputs))
    handle.remove()
    per_add = _gated_add_kernels(shapes[0])
    assert ours.kernels - ideal.kernels == sum(g + n * per_add + 2 * u for g, n, u in EXTRA[name])
    extra = set(ours.counts - ideal.counts)
    assert not [op for op in extra if any(word in op for word in FORBIDDEN)], extra
    # FLOPs beyond the bound: the gate rows of the Linear modulations only (table gates cost no matmul).
    linear_gates = {"wan": 0, "pixart": 0, "sd3": 3 + 2 + 2, "cogvideox": 2 * 2}[name]
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    conditioning = hidden if name == "sd3" else model.config.get("time_embed_dim", 0)  # the gate Linear's input
    assert flops - ideal_flops == linear_gates * 2 * 2 * conditioning * hidden  # batch 2, 2 FLOPs per MAC
    # The plain cached modules (docs/any_model.md) still run every norm, modulation and the cross-attention.
    assert plain.kernels > ours.kernels + 20 and plain.bytes > 1.5 * ours.bytes
    # What the blocks cost on a forecast step against a full step (tiny models: the embedders weigh a lot).
    assert ours.kernels - ideal.kernels < (full.kernels - ideal.kernels) / 3
    assert ours.bytes - ideal.bytes < (full.bytes - ideal.bytes) / 2


@pytest.mark.parametrize("name", families.NAMES)
def test_benchmark_hooks_sample_with_the_preset_and_the_bound(name):
    """What the common benchmark runs per family: its model's sampling loop, uncached, with the preset, skipped."""
    case = families.bench_case(name, "smoke")
    config = CacheConfig(interval=4, max_order=1, first_enhance=1)
    reference = families.sample(case, 9)
    outs = {}
    for label, attach in families.BENCH_ROWS.items():
        cache = attach(case.model, config, 9)
        outs[label] = families.sample(case, 9)
        assert [r.step for r in cache.history if r.full] == [0, 4, 8], label
        taylorseer.remove(case.model)
    assert torch.equal(families.sample(case, 9), reference)
    ours, ideal = (float((outs[k] - reference).norm() / reference.norm()) for k in ("ours", "ideal"))
    assert 0 < ours < ideal  # forecasting stays closer to the uncached run than skipping the blocks


# Per family at smoke size: the latents' channels in hidden_states (what the loop updates: PixArt's learned-sigma
# outputs and HunyuanVideo 1.5's condition channels are not latents), and the timestep its diffusers pipeline passes
# at scheduler timestep 250 (FLUX, QwenImage, Flux2: t / 1000; Lumina2: 1 - t / 1000; the others t).
LATENTS = {"wan": 4, "sd3": 4, "pixart": 4, "cogvideox": 4, "flux": 16, "hunyuan_video": 4, "qwenimage": 16,
           "flux2": 16, "ltx": 8, "hunyuan_video15": 4, "sana": 4, "lumina2": 4, "cogview4": 4}
AT_250 = {"flux": 0.25, "qwenimage": 0.25, "flux2": 0.25, "lumina2": 0.75}


@pytest.mark.parametrize("name", families.NAMES)
def test_every_family_builds_and_one_call_returns_its_latents(name):
    case = families.bench_case(name, "smoke")
    x, d = case.inputs["hidden_states"], families.loop_of(name).channel_dim
    with torch.no_grad():
        out = case()[0]
    assert min(out.shape[d], x.shape[d]) == LATENTS[name]
    assert out.shape[:d] + out.shape[d + 1:] == x.shape[:d] + x.shape[d + 1:]
    assert families.inputs(name, case.model, timestep=250.0)["timestep"].tolist() == [AT_250.get(name, 250)]
    sampled = families.sample(case, 3)
    n = LATENTS[name]
    assert sampled.shape == x.shape and torch.isfinite(sampled).all()
    assert not torch.equal(sampled.narrow(d, 0, n), x.narrow(d, 0, n))  # the latents moved, the rest did not
    assert torch.equal(sampled.narrow(d, n, x.shape[d] - n), x.narrow(d, n, x.shape[d] - n))


@pytest.mark.parametrize("name", families.NAMES)
def test_a_counted_forecast_step_lies_between_the_bound_and_a_full_step(name):
    costs = families.forecast_costs(name, "smoke")
    ours, ideal, full = costs["ours"], costs["ideal"], costs["full"]
    assert ideal["kernels"] <= ours["kernels"] < full["kernels"]
    assert ideal["bytes"] < ours["bytes"] < full["bytes"] and ours["cache_bytes"] > 0
    # the forecast arithmetic adds little to the bound next to what the blocks cost on a full step
    assert ours["kernels"] - ideal["kernels"] < (full["kernels"] - ideal["kernels"]) / 3


def test_counted_forecast_costs_order_the_variants():
    costs = families.forecast_costs("wan", "smoke")
    assert costs["ideal"]["kernels"] < costs["ours"]["kernels"] < costs["plain modules"]["kernels"]
    assert costs["ideal"]["bytes"] < costs["ours"]["bytes"] < costs["plain modules"]["bytes"] < costs["full"]["bytes"]
    # The two blocks' branches fold into five features (cross-attention sum, and per gate row the table-weighted sum
    # and the plain sum: taylorseer.attach.fold) where plain modules keep six (2 blocks x 3 branches).
    assert costs["ours"]["cache_bytes"] * 6 == costs["plain + cross-attention"]["cache_bytes"] * 5 > 0
