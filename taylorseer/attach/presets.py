"""Family presets: which branches of each block TaylorSeer caches, written as block descriptions.

``taylorseer.apply(pipe_or_transformer, config)`` finds the preset from the transformer's class (its MRO, so
subclasses match). Each preset is a function of the model (and options) returning ``{block name: BlockSpec}``;
the core builds the full-step records and the forecast-step forwards from it (:mod:`taylorseer.attach.blocks`).

| preset | classes | cached per block (gate) |
| --- | --- | --- |
| dit | DiT (TaylorSeer-DiT) | attn, mlp (adaLN rows 2, 5 of 6) |
| flux | FluxTransformer2DModel | double: attn image output, ff (norm1 rows 2, 5); single: proj_out's image tokens |
| hunyuan_video | HunyuanVideoTransformer3DModel | double: attn, ff, ff_context (plain); single: proj_out (row 2/3) |
| wan | WanTransformer3DModel | attn1, ffn (table rows 2, 5, fp32), attn2 ungated |
| sd3 | SD3Transformer2DModel | attn image output, attn2 (SD3.5), ff (norm1 rows 2, 5, 8) |
| pixart | PixArtTransformer2DModel | attn1, ff (table rows 2, 5), attn2 ungated |
| cogvideox | CogVideoXTransformer3DModel | attn1 video output (norm1 row 2), ff video tokens (norm2 row 2) |
| qwenimage | QwenImageTransformer2DModel | attn image output, img_mlp (img_mod rows 2, 5 of 6) |

Any other class: no preset needed, each block's path is derived and verified (:mod:`taylorseer.attach.derive`).

Text streams are not forecast where nothing reads them on a forecast step (no attention runs there, and
these models' outputs read the image/video tokens only); FLUX keeps ``forecast_text`` (upstream's choice)
and HunyuanVideo its upstream behaviour by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .blocks import BlockSpec, Branch, LinearGate, TableGate

H, E = "hidden_states", "encoder_hidden_states"


@dataclass(frozen=True)
class Preset:
    """A named description of a model family: ``describe(model) -> {block name: BlockSpec}``."""

    name: str
    classes: tuple[str, ...]
    describe: Callable[[torch.nn.Module], dict[str, BlockSpec]]
    options: dict = field(default_factory=dict)
    summary: str = ""

    def blocks(self, model: torch.nn.Module) -> dict[str, BlockSpec]:
        return self.describe(model, **self.options)


def _each(model: torch.nn.Module, path: str, spec_of: Callable[[torch.nn.Module], BlockSpec]) -> dict[str, BlockSpec]:
    blocks = getattr(model, path, None) or []
    return {f"{path}.{i}": spec_of(block) for i, block in enumerate(blocks)}


# ------------------------------------------------------------------------------------------------- DiT
def _dit(model, short: bool = True) -> dict[str, BlockSpec]:
    def gate(i):
        return LinearGate("adaLN_modulation.1", i, 6, input="c")

    spec = BlockSpec((Branch("attn", gate(2), into="x"), Branch("mlp", gate(5), into="x")), returns="x", short=short)
    return _each(model, "blocks", lambda _: spec)


# ------------------------------------------------------------------------------------------------ FLUX
def _flux(model, forecast_text: bool = False, short_double: bool = True) -> dict[str, BlockSpec]:
    def gate(linear, i, n=6):
        return LinearGate(linear, i, n)

    image = (Branch("attn", gate("norm1.linear", 2), output=0), Branch("ff", gate("norm1.linear", 5)),
             Branch("attn", None, output=2, optional=True))  # IP-adapter output: added ungated, last
    text = (Branch("attn", gate("norm1_context.linear", 2), into=E, output=1),
            Branch("ff_context", gate("norm1_context.linear", 5), into=E))
    if not short_double:  # the block's own forward: every module it calls must be cached whole
        double = BlockSpec(image[:2] + text, returns=(E, H), short=False)
    else:
        double = BlockSpec(image + (text if forecast_text else ()), returns=(E, H), clip_fp16=(E,))
    single_gate = gate("norm.linear", 2, 3)
    single = (Branch("proj_out", single_gate, tokens=(E, H)),)
    if forecast_text:
        single += (Branch("proj_out", single_gate, into=E, tokens=(E, H)),)
    single_spec = BlockSpec(single, returns=(E, H), clip_fp16=(E, H))
    return {**_each(model, "transformer_blocks", lambda _: double),
            **_each(model, "single_transformer_blocks", lambda _: single_spec)}


# ---------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan_video(model, single_attention: bool = True, lean: bool = False) -> dict[str, BlockSpec]:
    """Upstream by default: double blocks as plain cached modules, single blocks' whole branch forecast
    (video and text tokens). ``lean=True``: short double blocks too and no text forecast (same video, less work)."""
    kinds = {type(b).__name__ for b in getattr(model, "transformer_blocks", [])}
    kinds |= {type(b).__name__ for b in getattr(model, "single_transformer_blocks", [])}
    if not kinds or not kinds <= {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"}:
        raise TypeError(f"TaylorSeer-HunyuanVideo caches HunyuanVideoTransformer3DModel's text-to-video blocks; "
                        f"found {sorted(kinds) or ['no transformer_blocks']} (image-to-video token-replace blocks are "
                        f"not supported)")

    def gate(linear, i, n=6):
        return LinearGate(linear, i, n)

    image = (Branch("attn", gate("norm1.linear", 2), output=0), Branch("ff", gate("norm1.linear", 5)))
    text = (Branch("attn", gate("norm1_context.linear", 2), into=E, output=1),
            Branch("ff_context", gate("norm1_context.linear", 5), into=E))
    double = BlockSpec(image, returns=(H, E)) if lean else BlockSpec(image + text, returns=(H, E), short=False)
    g = gate("norm.linear", 2, 3)
    branch = (Branch("proj_out", g, tokens=(H, E)),)
    if not lean:
        branch += (Branch("proj_out", g, into=E, tokens=(H, E)),)
    record = ("attn",) if single_attention and not lean else ()
    single = BlockSpec(branch, returns=(H, E), split_storage="parts" if lean else "whole", record_only=record)
    return {**_each(model, "transformer_blocks", lambda _: double),
            **_each(model, "single_transformer_blocks", lambda _: single)}


# -------------------------------------------------------------------------------------------------- Wan
def _wan(model) -> dict[str, BlockSpec]:
    def gate(i):
        return TableGate("scale_shift_table", i, 6, input="temb", float32=True)

    spec = BlockSpec((Branch("attn1", gate(2)), Branch("attn2"), Branch("ffn", gate(5))))
    return _each(model, "blocks", lambda _: spec)


# -------------------------------------------------------------------------------------------------- SD3
def _sd3(model) -> dict[str, BlockSpec]:
    def spec_of(block):
        chunks = 9 if block.use_dual_attention else 6
        gate = lambda i: LinearGate("norm1.linear", i, chunks)  # noqa: E731
        branches = (Branch("attn", gate(2), output=0),)
        if block.use_dual_attention:  # SD3.5: a second (self-)attention on the image tokens, gate row 8
            branches += (Branch("attn2", gate(8)),)
        branches += (Branch("ff", gate(5)),)
        # The text stream is read by nothing on a forecast step; the last block returns None for it.
        return BlockSpec(branches, returns=(None if block.context_pre_only else E, H))

    return _each(model, "transformer_blocks", spec_of)


# ----------------------------------------------------------------------------------------------- PixArt
def _pixart(model) -> dict[str, BlockSpec]:
    def spec_of(block):
        if block.norm_type != "ada_norm_single":
            raise TypeError(f"the pixart preset caches ada_norm_single blocks; this block has norm_type "
                            f"{block.norm_type!r}")

        def gate(i):
            return TableGate("scale_shift_table", i, 6, input="timestep")

        branches = (Branch("attn1", gate(2)),) + ((Branch("attn2"),) if block.attn2 is not None else ())
        return BlockSpec(branches + (Branch("ff", gate(5)),))

    return _each(model, "transformer_blocks", spec_of)


# -------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox(model) -> dict[str, BlockSpec]:
    spec = BlockSpec((Branch("attn1", LinearGate("norm1.linear", 2, 6), output=0),
                      Branch("ff", LinearGate("norm2.linear", 2, 6), tokens=(E, H))), returns=(H, E))
    return _each(model, "transformer_blocks", lambda _: spec)


# ------------------------------------------------------------------------------------------- QwenImage
def _qwenimage(model) -> dict[str, BlockSpec]:
    """``img_mod(temb)`` is chunked in two (attention, MLP), each in three (shift, scale, gate): the gates are
    rows 2 and 5 of six. The text stream is read by nothing on a forecast step."""
    def spec_of(block):
        if getattr(block, "zero_cond_t", False):
            raise TypeError("the qwenimage preset reads one gate per sample; zero_cond_t blocks pick gates per token "
                            "(use taylorseer.apply(model, config, preset='derive'))")
        gate = lambda i: LinearGate("img_mod.1", i, 6)  # noqa: E731
        return BlockSpec((Branch("attn", gate(2), output=0), Branch("img_mlp", gate(5))), returns=(E, H),
                         clip_fp16=(H,))

    return _each(model, "transformer_blocks", spec_of)


_FAMILIES: dict[str, tuple[tuple[str, ...], Callable, str]] = {
    "dit": (("DiT",), _dit, "attn, mlp"),
    "flux": (("FluxTransformer2DModel",), _flux, "double: attn (image), ff; single: proj_out (image tokens)"),
    "hunyuan_video": (("HunyuanVideoTransformer3DModel",), _hunyuan_video,
                      "double: attn, ff, ff_context (plain modules); single: proj_out (+ attn record)"),
    "wan": (("WanTransformer3DModel",), _wan, "attn1, ffn (gated), attn2 (ungated)"),
    "sd3": (("SD3Transformer2DModel",), _sd3, "attn (image), attn2 (SD3.5), ff"),
    "pixart": (("PixArtTransformer2DModel",), _pixart, "attn1, ff (gated), attn2 (ungated)"),
    "cogvideox": (("CogVideoXTransformer3DModel",), _cogvideox, "attn1 (video), ff (video tokens)"),
    "qwenimage": (("QwenImageTransformer2DModel",), _qwenimage, "attn (image output), img_mlp (img_mod rows 2, 5)"),
}

NAMES = tuple(_FAMILIES)


def get(name: str, **options) -> Preset:
    """The preset ``name`` with its options (e.g. ``get("flux", forecast_text=True)``)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown preset {name!r}; presets: {list(_FAMILIES)}")
    classes, describe, summary = _FAMILIES[name]
    return Preset(name, classes, describe, dict(options), summary)


def find(model: torch.nn.Module) -> Preset | None:
    """The preset serving ``model``'s class or one of its bases, or None."""
    for cls in type(model).__mro__:
        for name, (classes, _, _) in _FAMILIES.items():
            if cls.__name__ in classes:
                return get(name)
    return None


def cached_modules(model: torch.nn.Module, preset: Preset | str | None = None) -> list[str]:
    """Names of the modules of ``model`` whose outputs ``preset`` records on full steps (its branches' modules and
    its record-only modules), in ``model.named_modules()`` order. ``preset`` defaults to the one of the model's class.

    The apps take their lists of cached modules from here (calibration sketches, FLOPs and cache-size counts)
    instead of writing them out a second time."""
    if preset is None:
        preset = find(model)
        if preset is None:
            raise ValueError(f"no preset for {type(model).__name__}; presets: {list(_FAMILIES)}")
    elif isinstance(preset, str):
        preset = get(preset)
    wanted = {f"{block}.{module}" for block, spec in preset.blocks(model).items()
              for module in [b.module for b in spec.branches] + list(spec.record_only)}
    return [name for name, _ in model.named_modules() if name in wanted]


def supported() -> dict[str, tuple[str, ...]]:
    """Preset name -> the transformer classes it serves."""
    return {name: classes for name, (classes, _, _) in _FAMILIES.items()}
