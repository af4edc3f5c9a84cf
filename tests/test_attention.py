"""Attention backend selection: SDPA by default and unchanged, flash-attn / xformers selectable, one clear
error naming the fallback when a backend is missing or cannot run on the device."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch

from taylorseer.perf import attention
from taylorseer.perf.attention import AttentionBackendError, check_attention_backend, set_attention_backend
from taylorseer_dit.models import DiT_models


def _dit():
    torch.manual_seed(0)
    model = DiT_models["DiT-Tiny/2"](input_size=8, num_classes=10, in_channels=4).eval()
    model.initialize_weights(zero_init=False)
    return model


def _call(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.tensor([1, 2]))


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """Install a stand-in module for the duration of a test (flash-attn cannot be installed here)."""

    def make(name: str, source: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "__init__.py").write_text(textwrap.dedent(source))
        (folder / "ops.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        attention._probe.cache_clear()
        made.append(name)

    made = []
    yield make
    # The stand-in must not outlive the test: an imported module stays in sys.modules (where find_spec and
    # import look first), so later tests would see a "working" flash-attn on the CPU.
    for mod in [m for m in sys.modules if any(m == name or m.startswith(name + ".") for name in made)]:
        del sys.modules[mod]
    attention._probe.cache_clear()


def test_sdpa_is_the_default_and_selecting_it_changes_nothing():
    model = _dit()
    reference = _call(model)
    assert set_attention_backend(model, "sdpa") == "sdpa"
    assert torch.equal(_call(model), reference)
    assert attention.available_backends("cpu")[0] == "sdpa"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"attention_backend='flash2' is invalid: expected one of \['sdpa', 'flash'"):
        set_attention_backend(_dit(), "flash2")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_a_missing_package_fails_with_one_line_naming_the_fallback():
    model = _dit()
    with pytest.raises(AttentionBackendError) as info:
        set_attention_backend(model, "flash")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("attention_backend=flash is not available: flash_attn is not installed")
    assert "use attention_backend=sdpa" in message
    assert all(b.attn.attention is torch.nn.functional.scaled_dot_product_attention for b in model.blocks)


CPU_LESS_XFORMERS = """
    def memory_efficient_attention(q, k, v, *args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\\n"
                                  f"     query : shape={tuple(q.shape)} device={q.device}")
"""


def test_a_backend_that_cannot_run_on_the_device_names_the_fallback(fake_package):
    # What xformers 0.0.35 does on a CPU (it installs, but has no CPU kernel).
    fake_package("xformers", CPU_LESS_XFORMERS)
    model = _dit()
    reference = _call(model)
    with pytest.raises(AttentionBackendError, match=r"^attention_backend=xformers cannot run on cpu: "
                       r"NotImplementedError: No operator found for `memory_efficient_attention_forward`.*; "
                       r"use attention_backend=sdpa"):
        set_attention_backend(model, "xformers")
    assert torch.equal(_call(model), reference)  # nothing changed


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_real_xformers_on_the_cpu_is_refused():
    with pytest.raises(AttentionBackendError, match="xformers cannot run on cpu.*attention_backend=sdpa"):
        check_attention_backend("xformers", "cpu")


WORKING_FLASH = """
    import torch.nn.functional as F

    def flash_attn_func(q, k, v, *args, **kwargs):  # (B, T, H, D) like flash-attn
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
"""


def test_dit_uses_the_selected_backend(fake_package):
    fake_package("flash_attn", WORKING_FLASH)
    model = _dit()
    reference = _call(model)
    assert set_attention_backend(model, "flash") == "flash"
    assert all(b.attn.attention is not torch.nn.functional.scaled_dot_product_attention for b in model.blocks)
    torch.testing.assert_close(_call(model), reference, rtol=1e-5, atol=1e-5)
    set_attention_backend(model, "sdpa")
    assert torch.equal(_call(model), reference)


def test_diffusers_models_get_diffusers_backend_names(fake_package):
    from diffusers import FluxTransformer2DModel

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_flux import TINY_TRANSFORMER

    model = FluxTransformer2DModel(**TINY_TRANSFORMER).eval()
    processors = [m.processor for m in model.modules() if hasattr(m, "processor")]
    assert set_attention_backend(model, "sdpa") == "native"
    assert all(p._attention_backend is None for p in processors)
    # A backend that passes our probe but not diffusers' own requirement check (flash-attn's version):
    # the same one-line error, and the model keeps SDPA.
    fake_package("flash_attn", WORKING_FLASH)
    with pytest.raises(AttentionBackendError, match=r"^attention_backend=flash cannot be used by "
                       r"FluxTransformer2DModel: .*; use attention_backend=sdpa"):
        set_attention_backend(model, "flash")
    assert all(p._attention_backend is None for p in processors)
