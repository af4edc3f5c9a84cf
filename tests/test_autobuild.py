"""autobuild: a small instance and one call's inputs for diffusers classes nobody wrote anything for, and what
apply() and the discovery command do with them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import taylorseer
from taylorseer.attach import autobuild, families, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# Classes neither taylorseer.attach.tiny nor the benchmark families build (a few M parameters each here)
UNKNOWN = ["AuraFlowTransformer2DModel", "AllegroTransformer3DModel", "CogView3PlusTransformer2DModel",
           "DiTTransformer2DModel", "HunyuanImageTransformer2DModel", "LongCatImageTransformer2DModel",
           "NucleusMoEImageTransformer2DModel", "OvisImageTransformer2DModel", "SanaVideoTransformer3DModel",
           "MotifVideoTransformer3DModel"]


def _loop(model, call, steps=8):
    """A flow loop on the latents (the first keyword argument), the model's prediction as the velocity."""
    kwargs = call(1000.0)
    name, x = next(iter(kwargs.items()))
    x = x.clone()
    with torch.no_grad():
        for i in range(steps):
            v = model(**dict(call(1000.0 * (1 - i / steps)), **{name: x}))
            v = autobuild._first_tensor(v)
            x = x - v.reshape(x.shape) / steps if v.numel() == x.numel() else x + v.mean() / steps
    return x


def test_small_config_cuts_layers_and_heads_and_keeps_the_head_width():
    import diffusers

    cfg = autobuild.small_config(diffusers.FluxTransformer2DModel)
    assert cfg == {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2}
    cfg = autobuild.small_config(diffusers.SD3Transformer2DModel)  # caption_projection_dim = the model's width
    assert cfg["num_attention_heads"] == 2 and cfg["caption_projection_dim"] == 2 * 64
    cfg = autobuild.small_config(diffusers.Lumina2Transformer2DModel)  # the width given as a total
    assert cfg["hidden_size"] == 2 * (2304 // 24) and cfg["num_kv_heads"] == 1


@pytest.mark.parametrize("name", UNKNOWN)
def test_an_unknown_class_is_built_and_runs_cached_on_the_first_call(name):
    assert tiny.find(name) is None and name not in {families.class_name(f) for f in families.NAMES}
    model, call = autobuild.build(name)
    ref = _loop(model, call)
    taylorseer.apply(model, taylorseer.CacheConfig(interval=1, max_order=1, first_enhance=2), num_steps=8)
    assert torch.equal(_loop(model, call), ref)  # interval 1: bit-identical to no cache
    taylorseer.remove(model)
    taylorseer.apply(model, taylorseer.CacheConfig(interval=3, max_order=1, first_enhance=1), num_steps=8)
    out = _loop(model, call)
    text = taylorseer.summary(model).describe()
    taylorseer.remove(model)
    # every layout says what it took; the cached run forecast (differs from uncached) and stayed finite
    assert ("derived description" in text or "branch modules" in text or "uncached" in text), text
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(_loop(model, call), ref)  # remove(): as it was


def test_a_class_without_inputs_found_says_what_to_do():
    with pytest.raises(autobuild.AutobuildError, match=r"ZImageTransformer2DModel: no inputs found .*inputs\.pt"):
        autobuild.build("ZImageTransformer2DModel")
    with pytest.raises(autobuild.AutobuildError, match="not a diffusers class"):
        autobuild.build("NoSuchTransformer")


def test_discover_command_traces_a_class_it_builds_itself():
    run = subprocess.run([sys.executable, "-m", "taylorseer.attach.discover", "AuraFlowTransformer2DModel"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "inputs found by autobuild" in run.stderr
    assert "gated residual branch" in run.stdout and "verified on the first step" in run.stdout
    assert "every block skipped (bound)" in run.stdout


def test_every_class_autobuild_serves_runs_cached_or_says_why():
    """All of diffusers' transformer classes: those autobuild serves (32 in diffusers 0.42.1) are bit-identical at
    interval 1, forecast at N=3 without a crash, and come back exactly after remove(); the rest raise one line."""
    import diffusers

    served, refused = [], []
    for name in sorted(n for n in dir(diffusers) if "Transformer" in n and n.endswith("Model")):
        try:
            model, call = autobuild.build(name)
        except autobuild.AutobuildError as err:
            assert "\n" not in str(err) and ("inputs.pt" in str(err) or "save_pretrained" in str(err)), str(err)
            refused.append(name)
            continue
        assert all(torch.equal(a, b) for a, b in zip(call(500.0).values(), call(500.0).values(), strict=True)
                   if torch.is_tensor(a))  # the same inputs on every call
        ref = _loop(model, call, 6)
        taylorseer.apply(model, taylorseer.CacheConfig(interval=1, max_order=1), num_steps=6)
        assert torch.equal(_loop(model, call, 6), ref), name
        taylorseer.remove(model)
        taylorseer.apply(model, taylorseer.CacheConfig(interval=3, max_order=1, first_enhance=1), num_steps=6)
        out = _loop(model, call, 6)
        taylorseer.remove(model)
        assert torch.isfinite(out).all() and not torch.equal(out, ref), name
        assert torch.equal(_loop(model, call, 6), ref), name
        served.append(name)
    assert len(served) >= 32, (served, refused)


def test_a_model_that_is_no_transformer_is_reported_not_crashed():
    """A UNet (blocks returning tuples of skips): discovery reports every layout uncached and each candidate that
    breaks the model as an error entry, instead of stopping at the first TypeError."""
    from taylorseer.attach.discover import discover

    model, call = autobuild.build("UNet2DConditionModel")
    report = discover(model, call(500.0))
    assert report.verification and all("uncached" in line for line in report.verification), report.verification
    assert any("error" in cost for cost in report.costs.values()), report.costs
