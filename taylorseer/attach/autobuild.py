"""A small random instance of any diffusers transformer class, and one call's inputs, found without being told.

    model, call = autobuild.build("AuraFlowTransformer2DModel")   # or raises AutobuildError, one line: why
    out = model(**call(500.0))

What ``python -m taylorseer.attach.discover <Class>`` uses for a class that :mod:`taylorseer.attach.tiny` and
the benchmark families do not know. Two searches, both checked by running the model:

* **The instance.** The class's own defaults with every layer count cut to at most 2 and every head count to
  at most 2 (key/value heads too). The head width is kept, so rotary axes that must sum to it still do; where
  the width is given as a total (``hidden_size``, ``dim``) it is cut with the heads, keeping the head width.
* **The inputs.** From the names of ``forward``'s parameters and the instance's config: latents as images
  ``(B, C, H, W)``, videos ``(B, C, F, H, W)`` or packed tokens ``(B, S, C)``; text states ``(B, 7, D)``
  for each text width in the config; timesteps, masks, pooled projections, guidance, position ids. Every
  combination is tried in a fixed order until one forward runs and returns a tensor shaped like the
  latents; at most ``MAX_TRIES`` forwards.

Nothing is guessed silently: a class that no combination serves raises :class:`AutobuildError` naming the
last error and the fix (save one real call's keyword arguments as ``inputs.pt`` beside the config).
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Callable

import torch

B = 1
TEXT_TOKENS = 7
MAX_TRIES = 96
_LAYERS = re.compile(r"(^|_)(num_|n_)?(\w+_)?(layers|blocks)$|^depth$")
_HEADS = re.compile(r"(^|_)(num_attention_heads|n_heads|num_heads)$")
_KV_HEADS = re.compile(r"(kv_heads|key_value_heads)$")
_TEXT_WIDTHS = ("joint_attention_dim", "text_dim", "text_embed_dim", "caption_channels", "cross_attention_dim",
                "cap_feat_dim", "encoder_hidden_states_channels", "context_dim", "text_hidden_size",
                "encoder_hid_dim", "text_embed_2_dim")
_SKIP = {"return_dict", "attention_kwargs", "joint_attention_kwargs", "cross_attention_kwargs"}


class AutobuildError(RuntimeError):
    """No small instance or no inputs were found for a class; the message says why and what to do.
    ``errors``: what each tried input layout raised, in order."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or []


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


def small_config(cls) -> dict:
    """The keyword arguments that make ``cls`` small: layer and head counts cut, head width kept."""
    defaults, out = _defaults(cls), {}
    heads_key = next((k for k in defaults if _HEADS.search(k) and isinstance(defaults[k], int)), None)
    for key, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            continue
        if _LAYERS.search(key) and "dim" not in key:
            out[key] = min(value, 2)
        elif _HEADS.search(key) or _KV_HEADS.search(key):
            out[key] = min(value, 2 if not _KV_HEADS.search(key) or value >= defaults.get(heads_key, 0) else 1)
    for key, value in defaults.items():
        if key in ("sample_height", "sample_width") and isinstance(value, int):
            out[key] = 8  # learned / fixed position tables sized by these: match the small latents
        elif key == "max_text_seq_length" and isinstance(value, int):
            out[key] = TEXT_TOKENS  # a position table over text + latent tokens
        elif key == "sample_frames" and isinstance(value, int):
            out[key] = 5  # 2 latent frames after 4x temporal compression
        elif "layers" in key and isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            out[key] = type(value)(v for v in value if v < 2) or type(value)([0])  # indices of cut layers
    if heads_key is None:
        return out
    head_dim = defaults.get("attention_head_dim")
    if not isinstance(head_dim, int):  # the width is a total: keep the head width
        total = next((defaults[k] for k in ("hidden_size", "dim", "inner_dim") if isinstance(defaults.get(k), int)),
                     None)
        head_dim = total // defaults[heads_key] if total and total % defaults[heads_key] == 0 else None
    if head_dim:
        # every width equal to the model's width (hidden_size, caption_projection_dim, ...) follows it
        width, small = head_dim * defaults[heads_key], head_dim * out[heads_key]
        for key, value in defaults.items():
            if value == width and not isinstance(value, bool) and key not in out:
                out[key] = small
    return out


def _patches(config) -> tuple[int, int]:
    """(spatial, temporal) patch sizes read from the config."""
    def first(v):
        return int(v[-1] if isinstance(v, (tuple, list)) else v)

    p = config.get("patch_size", config.get("all_patch_size", 2)) or 1
    pt = config.get("patch_size_t", config.get("all_f_patch_size", 1)) or 1
    if isinstance(p, (tuple, list)) and len(p) == 3:
        pt, p = p[0], p[-1]
    return first(p), first(pt)


def _latents(config, class_name) -> list[tuple[str, torch.Tensor, dict]]:
    """Candidate latents: (layout, tensor, the sizes that go with it); a 3D class tries videos first."""
    c = int(config.get("in_channels", config.get("in_dim", 4)) or 4)
    p, pt = _patches(config)
    h = w = 4 * p
    f = 2 * pt
    image = ("image", torch.randn(B, c, h, w), dict(frames=1, height=h, width=w, tokens=(h // p) * (w // p)))
    video = ("video", torch.randn(B, c, f, h, w), dict(frames=f, height=h, width=w,
                                                        tokens=(f // pt) * (h // p) * (w // p)))
    frames_first = ("video (B, F, C, H, W)", torch.randn(B, f, c, h, w), video[2])
    packed = ("packed", torch.randn(B, 16, c), dict(frames=1, height=4, width=4, tokens=16))
    return [video, frames_first, image, packed] if "3D" in class_name else [image, packed, video, frames_first]


def _text_widths(config) -> list[int]:
    out = []
    for key in _TEXT_WIDTHS:
        v = config.get(key)
        v = v[0] if isinstance(v, (list, tuple)) and v and isinstance(v[0], int) else v
        if isinstance(v, int) and not isinstance(v, bool) and v > 0 and v not in out:
            out.append(v)
    return out or [32]


def _ids(tokens: int, axes: int, sizes: dict) -> torch.Tensor:
    ids = torch.zeros(tokens, axes)
    if axes >= 2:
        ids[:, -1] = torch.arange(tokens) % max(1, sizes["width"])
        ids[:, -2] = torch.arange(tokens) // max(1, sizes["width"])
    return ids


def _candidates(cls, model) -> list[Callable[[float], dict]]:
    """Input builders in the order they are tried."""
    config = dict(model.config)
    params = [(k, p) for k, p in inspect.signature(cls.forward).parameters.items()
              if k != "self" and k not in _SKIP and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    names = [k for k, _ in params]
    required = {k for k, p in params if p.default is inspect.Parameter.empty}
    latent_name = next((k for k in names if k in ("hidden_states", "x", "sample", "latents")),
                       names[0] if names else None)
    text_names = [k for k in names if re.search(r"encoder_hidden_states(_\d)?$|^cap_feats$|^context$", k)]
    axes = len(config.get("axes_dims_rope", config.get("axes_dim_rope", ())) or ()) or 3
    pooled = config.get("pooled_projection_dim")
    out = []
    for (layout, latents, sizes), width in itertools.product(_latents(config, cls.__name__),
                                                             _text_widths(config)):
        for use_bool_mask in (False, True):
            def call(t, layout=layout, latents=latents, sizes=sizes, width=width, use_bool_mask=use_bool_mask):
                kw = {latent_name: latents}
                for k in text_names:
                    kw[k] = torch.randn(B, TEXT_TOKENS, _width_of(k, config, width),
                                        generator=torch.Generator().manual_seed(1))
                for k in names:
                    if k in kw:
                        continue
                    patch = 1 if layout == "packed" else _patches(config)[0]  # packed tokens are patches already
                    value = _value(k, t, sizes, axes, pooled, use_bool_mask, config, patch)
                    if value is not None and (k in required or _wanted(k)):
                        kw[k] = value
                kw["return_dict"] = False if "return_dict" in inspect.signature(cls.forward).parameters else None
                return {k: v for k, v in kw.items() if v is not None}
            out.append(call)
    return out


def _width_of(name: str, config: dict, width: int) -> int:
    """A second text input (``encoder_hidden_states_2``) has its own width key (``text_embed_2_dim``)."""
    suffix = re.search(r"_(\d)$", name)
    if suffix:
        for key in _TEXT_WIDTHS:
            if key.endswith(f"_{suffix.group(1)}_dim") and isinstance(config.get(key), int):
                return config[key]
    return width


def _wanted(name: str) -> bool:
    """Optional arguments these models need in practice (without them most return garbage or raise)."""
    return bool(re.search(r"^timesteps?$|^t$|^class_labels$|^image_embeds$|pooled|guidance|_ids$|mask(_\d)?$|"
                          r"^num_frames$|^height$|^width$|_size$|crop_coords|img_shapes|added_cond_kwargs", name))


def _value(name, t, sizes, axes, pooled, use_bool_mask, config, patch):
    """The value of one forward argument by its name, or None where the name says nothing."""
    if re.fullmatch(r"timesteps?|t|sigma|r_timestep|timestep_r", name):
        return torch.full((B,), float(t))
    if re.search(r"encoder\w*mask", name):
        mask = torch.ones(B, TEXT_TOKENS)
        return mask.bool() if use_bool_mask else mask
    if name.startswith("pooled"):
        return torch.randn(B, pooled, generator=torch.Generator().manual_seed(2)) if pooled else None  # same each call
    if name == "guidance":
        return torch.full((B,), 3.5) if config.get("guidance_embeds", True) else None
    if name in ("original_size", "target_size"):
        return torch.tensor([[8.0 * sizes["height"], 8.0 * sizes["width"]]] * B)
    if name == "crop_coords":
        return torch.zeros(B, 2)
    if name == "img_shapes":
        return [(sizes["frames"], sizes["height"] // patch, sizes["width"] // patch)] * B
    if name == "added_cond_kwargs":
        return {"resolution": torch.tensor([[8.0 * sizes["height"], 8.0 * sizes["width"]]] * B),
                "aspect_ratio": torch.ones(B, 1)}
    if name == "image_embeds" and isinstance(config.get("image_embed_dim"), int):
        return torch.zeros(B, 4, config["image_embed_dim"])
    if name == "class_labels":
        return torch.zeros(B, dtype=torch.long)
    if name == "img_ids":
        return _ids(sizes["tokens"], axes, sizes)
    if name == "txt_ids":
        return torch.zeros(TEXT_TOKENS, axes)
    if name in ("num_frames", "height", "width"):
        return {"num_frames": sizes["frames"], "height": sizes["height"], "width": sizes["width"]}[name]
    return None


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return getattr(out, "sample", None)


def build(class_or_name, seed: int = 0) -> tuple[torch.nn.Module, Callable[[float], dict]]:
    """``(model, call)`` for a diffusers transformer class (or its name): eval mode, fp32, CPU."""
    import diffusers

    cls = getattr(diffusers, class_or_name, None) if isinstance(class_or_name, str) else class_or_name
    if not isinstance(cls, type):
        raise AutobuildError(f"{class_or_name!r} is not a diffusers class")
    torch.manual_seed(seed)
    try:
        model = cls(**small_config(cls)).eval()
    except Exception as err:  # noqa: BLE001 - any constructor failure is reported in one line
        raise AutobuildError(f"{cls.__name__}: no small instance from its defaults ({type(err).__name__}: "
                             f"{_short(err)}); save a small one with save_pretrained and give the folder") from None
    last, candidates = "no forward parameters", _candidates(cls, model)[:MAX_TRIES]
    errors = []
    for call in candidates:
        kwargs = call(500.0)
        try:
            with torch.no_grad():
                out = _first_tensor(model(**kwargs))
        except Exception as err:  # noqa: BLE001 - a wrong guess; the next candidate is tried
            last = f"{type(err).__name__}: {_short(err)}"
            errors.append(last)
            continue
        latents = next(iter(kwargs.values()))
        if out is not None and out.shape[0] == latents.shape[0] and out.numel() > 0:
            return model, call
        last = f"output {None if out is None else tuple(out.shape)} does not match the latents"
    raise AutobuildError(f"{cls.__name__}: no inputs found for its forward after {len(candidates)} "
                         f"tries (last: {last}); save one real call's keyword arguments with "
                         f"torch.save(kwargs, 'folder/inputs.pt') beside its config.json and give the folder", errors)


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:160]
