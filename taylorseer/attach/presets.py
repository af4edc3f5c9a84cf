"""Family presets: which branches of each block TaylorSeer caches, written as block descriptions.

``taylorseer.apply(pipe_or_transformer, config)`` finds the preset from the transformer's class (its MRO, so
subclasses match). Each preset is a function of the model (and options) returning ``{block name: BlockSpec}``;
the core builds the full-step records and the forecast-step forwards from it (:mod:`taylorseer.attach.blocks`).

| preset | classes | cached per block (gate) |
| --- | --- | --- |
| dit | DiT (TaylorSeer-DiT) | attn, mlp (adaLN rows 2, 5 of 6) |
| flux | FluxTransformer2DModel | double: attn image output, ff (norm1 rows 2, 5); single: proj_out's image tokens |
| hunyuan_video | HunyuanVideoTransformer3DModel | double: attn, ff, ff_context (plain); single: proj_out (row 2/3) |
| wan | WanTransformer3DModel (Wan 2.1, 2.2) | attn1, ffn (table rows 2, 5, fp32; TI2V: per token), attn2 ungated |
| sd3 | SD3Transformer2DModel | attn image output, attn2 (SD3.5), ff (norm1 rows 2, 5, 8) |
| pixart | PixArtTransformer2DModel | attn1, ff (table rows 2, 5), attn2 ungated |
| cogvideox | CogVideoXTransformer3DModel | attn1 video output (norm1 row 2), ff video tokens (norm2 row 2) |
| qwenimage | QwenImageTransformer2DModel | attn image output, img_mlp (img_mod rows 2, 5 of 6) |
| flux2 | Flux2Transformer2DModel | double: attn image output, ff (chunks 2, 5 of input temb_mod_img); single: attn |
| ltx | LTXVideoTransformer3DModel | attn1, ff (table rows 2, 5 of a (B, S, 6C) temb), attn2 ungated |
| hunyuan_video15 | HunyuanVideo15Transformer3DModel | attn video output, ff (norm1 rows 2, 5) |
| sana | SanaTransformer2DModel | attn1, ff (channels-first output as tokens; table rows 2, 5), attn2 ungated |
| lumina2 | Lumina2Transformer2DModel | norm2, ffn_norm2: the post-norms' outputs (tanh of norm1 rows 1, 3 of 4) |
| cogview4 | CogView4Transformer2DModel | attn1 image output, ff's first call (image tokens) (norm1 rows 4, 10 of 12) |

Any other class: no preset needed, each block's path is derived and verified (:mod:`taylorseer.attach.derive`).

Text streams are not forecast where nothing reads them on a forecast step (no attention runs there, and
these models' outputs read the image/video tokens only); FLUX keeps ``forecast_text`` (upstream's choice)
and HunyuanVideo its upstream behaviour by default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .blocks import BlockSpec, Branch, ChunkGate, LinearGate, TableGate

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


# ------------------------------------------------------------------------------------------------ Flux2
def _flux2(model) -> dict[str, BlockSpec]:
    """Flux2 computes every block's modulation once per step and passes it in (``temb_mod_img``, ``temb_mod``):
    the gates are chunks of a block input. The single blocks update ``cat(text, image)`` as one stream (the text
    tokens are forecast too; the model drops them at the end). The double blocks' image stream has fewer tokens
    than the single blocks' stream of the same name, so under the collapsed step the double blocks run per block
    (``collapse=False``) and the single blocks, most of the model, as one run."""
    double = BlockSpec((Branch("attn", ChunkGate("temb_mod_img", 2, 6), output=0),
                        Branch("ff", ChunkGate("temb_mod_img", 5, 6))), returns=(E, H), clip_fp16=(E,),
                       collapse=False)
    single = BlockSpec((Branch("attn", ChunkGate("temb_mod", 2, 3)),), returns=H, clip_fp16=(H,))
    return {**_each(model, "transformer_blocks", lambda _: double),
            **_each(model, "single_transformer_blocks", lambda _: single)}


# ------------------------------------------------------------------------------------------- LTX-Video
def _ltx(model) -> dict[str, BlockSpec]:
    """``scale_shift_table + temb.reshape(B, S, 6, C)``: ``temb`` is ``(B, S, 6C)`` (S = 1, or per token)."""
    def gate(i):
        return TableGate("scale_shift_table", i, 6, input="temb")

    spec = BlockSpec((Branch("attn1", gate(2)), Branch("attn2"), Branch("ff", gate(5))))
    return _each(model, "transformer_blocks", lambda _: spec)


# ---------------------------------------------------------------------------------------- HunyuanVideo 1.5
def _hunyuan_video15(model) -> dict[str, BlockSpec]:
    """Double-stream blocks only (``AdaLayerNormZero`` rows 2, 5 of 6); the output reads the video tokens, so the
    text stream is neither recorded nor forecast."""
    def gate(i):
        return LinearGate("norm1.linear", i, 6)

    spec = BlockSpec((Branch("attn", gate(2), output=0), Branch("ff", gate(5))), returns=(H, E))
    return _each(model, "transformer_blocks", lambda _: spec)


# ------------------------------------------------------------------------------------------------- Sana
def _sana(model) -> dict[str, BlockSpec]:
    """The feed-forward is convolutional: its ``(B, C, H, W)`` output is added as tokens (``channels_first``)."""
    def spec_of(block):
        def gate(i):
            return TableGate("scale_shift_table", i, 6, input="timestep")

        cross = (Branch("attn2"),) if block.attn2 is not None else ()
        return BlockSpec((Branch("attn1", gate(2)),) + cross + (Branch("ff", gate(5), channels_first=True),))

    return _each(model, "transformer_blocks", spec_of)


# ----------------------------------------------------------------------------------------------- Lumina2
def _lumina2(model) -> dict[str, BlockSpec]:
    """``x + tanh(g) * norm2(attn(...))``: the cached features are the post-norms' outputs, the gates the tanh of
    rows 1 and 3 of 4 of ``norm1.linear``. The unmodulated context refiner's branches are ungated. The three
    block lists update streams of one name with different token counts (text, image, joint): under the
    collapsed step the refiners run per block and ``layers``, most of the model, as one run."""
    def spec_of(block, collapse=True):
        if not block.modulation:
            return BlockSpec((Branch("norm2"), Branch("ffn_norm2")), collapse=collapse)

        def gate(i):
            return LinearGate("norm1.linear", i, 4, gate_activation="tanh")

        return BlockSpec((Branch("norm2", gate(1)), Branch("ffn_norm2", gate(3))), collapse=collapse)

    refiner = functools.partial(spec_of, collapse=False)
    return {**_each(model, "context_refiner", refiner), **_each(model, "noise_refiner", refiner),
            **_each(model, "layers", spec_of)}


# ---------------------------------------------------------------------------------------------- CogView4
def _cogview4(model) -> dict[str, BlockSpec]:
    """``norm1.linear(temb)`` (``temb`` already through SiLU) in 12 chunks, image gates 4 and 10; ``ff`` runs on the
    image tokens, then on the text: its first call is the image branch. The text stream is read by nothing on a
    forecast step."""
    def gate(i):
        return LinearGate("norm1.linear", i, 12, activation=None)

    spec = BlockSpec((Branch("attn1", gate(4), output=0), Branch("ff", gate(10), call=0)), returns=(H, E))
    return _each(model, "transformer_blocks", lambda _: spec)


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
    "flux2": (("Flux2Transformer2DModel",), _flux2, "double: attn (image), ff; single: attn (gates: chunks of "
              "temb_mod_img / temb_mod)"),
    "ltx": (("LTXVideoTransformer3DModel",), _ltx, "attn1, ff (table rows 2, 5 of (B, S, 6C) temb), attn2 (ungated)"),
    "hunyuan_video15": (("HunyuanVideo15Transformer3DModel",), _hunyuan_video15, "attn (video output), ff"),
    "sana": (("SanaTransformer2DModel",), _sana, "attn1, ff (channels first; table rows 2, 5), attn2 (ungated)"),
    "lumina2": (("Lumina2Transformer2DModel",), _lumina2, "norm2, ffn_norm2 (post-norm outputs; tanh gates)"),
    "cogview4": (("CogView4Transformer2DModel",), _cogview4, "attn1 (image output), ff's first call (image tokens)"),
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
