"""Checking an app's settings before anything is loaded: unknown keys, types, ranges, the model's family.

Hydra composes whatever it is given: ``num_steps=abc`` arrives as the string "abc", ``compare_uncached=no``
as the (truthy) string "no", ``+num_stpes=10`` as a new key nobody reads, and ``model=digits`` in the FLUX
app as a DiT model config. Each app declares its settings once (a flat ``{key: Setting}`` schema) and
:func:`check` turns every such case into one line that names the key, the value and what is allowed,
before any model or weight is touched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.config import CacheConfig
from .runfolder import flatten


class SettingsError(ValueError):
    """A setting is unknown or has a bad value; the message names it and what is allowed."""


@dataclass(frozen=True)
class Setting:
    """One setting: its kind (``int``, ``float``, ``bool``, ``str``, ``list``, ``any``) and its limits."""

    kind: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    multiple_of: int | None = None
    hint: str = ""
    pattern: str | None = None  # a str must match it whole (re.fullmatch)
    safe_path: bool = False  # a str that must stay below its folder: relative, no '..' part

    def problem(self, value) -> str | None:
        """Why ``value`` is not allowed (None when it is)."""
        if value is None:
            return None if self.nullable else f"expected {self._expected()}, got null"
        if self.choices is not None:
            return None if value in self.choices else f"expected one of {list(self.choices)}"
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "list": isinstance(value, (list, tuple)),
            "any": True,
        }[self.kind]
        if not ok:
            return f"expected {self._expected()}"
        if self.kind == "str" and self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"expected {self._expected()}"
        if self.kind == "str" and self.safe_path and (
                not value.strip() or value.startswith(("/", "~")) or ".." in re.split(r"[/\\]", value)):
            return f"expected {self._expected()}"
        if self.kind in ("int", "float"):
            low = self.minimum is not None and value < self.minimum
            if low or (self.maximum is not None and value > self.maximum):
                return f"expected {self._expected()}"
            if self.multiple_of and value % self.multiple_of:
                return f"expected a multiple of {self.multiple_of}"
        return None

    def _expected(self) -> str:
        noun = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "list": "a list", "any": "a value"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            noun += f" in [{self.minimum:g}, {self.maximum:g}]"
        elif self.minimum is not None:
            noun += f" >= {self.minimum:g}"
        if self.nullable:
            noun += " or null"
        return noun + (f" ({self.hint})" if self.hint else "")


# Keys of configs/base.yaml, shared by every app.
BASE = {
    "out_root": Setting("str"),
    "device": Setting("str", hint="auto, cpu, cuda or cuda:<index>", pattern=r"auto|cpu|cuda(:\d+)?"),
    "dtype": Setting("str", choices=("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")),
    "seed": Setting("int", minimum=0),
    "progress": Setting("bool"),
    "run_name": Setting("str", nullable=True, safe_path=True,
                        hint="a folder under out_root (relative, no '..'), or null for a name from the settings"),
    "accept_calibration_mismatch": Setting("bool", nullable=True, hint="true: use a calibration made for others"),
}


# Keys every diffusers-pipeline app (FLUX, HunyuanVideo) has.
PIPELINE_APP = {
    "model.family": Setting("str"),
    "model.name": Setting("str"),
    "model.short_name": Setting("str"),
    "model.path": Setting("str"),
    "prompt": Setting("any", nullable=True),
    "prompt_file": Setting("str", nullable=True),
    "negative_prompt": Setting("str", nullable=True),
    "num_steps": Setting("int", minimum=1),
    "guidance_scale": Setting("float", minimum=0.0),
    "true_cfg_scale": Setting("float", minimum=1.0),
    "max_sequence_length": Setting("int", minimum=1),
    "cache_impl": Setting("str", choices=("taylorseer", "diffusers")),
    "warmup": Setting("bool"),
    "cpu_offload": Setting("bool"),
    "vae_tiling": Setting("bool"),
    "attention_backend": Setting("str", choices=("sdpa", "flash", "xformers")),
    "compile": Setting("bool"),
    "parallel.ulysses": Setting("int", minimum=1),
    "parallel.ring": Setting("int", minimum=1),
}


def check_app(cfg, schema: Mapping[str, Setting], app: str, family: str, config_dir: str | Path):
    """Everything an app checks before loading anything: the model config's family (first: a config of
    another app would not even resolve), every key and value against ``schema``, the cache settings.
    Returns (the resolved config as a plain dict, the :class:`taylorseer.CacheConfig` or None without one)."""
    from omegaconf import OmegaConf


    check_model_family(OmegaConf.to_container(cfg.model, resolve=True), family, app, config_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    check(plain, schema, app)
    return plain, CacheConfig.from_dict(plain["cache"]) if "cache" in plain else None


def check(config: Mapping, schema: Mapping[str, Setting], app: str, delegated: tuple[str, ...] = ("cache",)) -> None:
    """Raise :class:`SettingsError` for the first unknown key or bad value of ``config`` (a resolved, plain dict).

    Keys under ``delegated`` prefixes are checked elsewhere (``cache.*`` by :class:`taylorseer.CacheConfig`).
    """
    flat = flatten(dict(config))
    schema = {**BASE, **schema}
    unknown = sorted(k for k in flat if k not in schema and not k.startswith(tuple(d + "." for d in delegated))
                     and k not in delegated)
    if unknown:
        top = sorted({k.split(".")[0] for k in schema})
        raise SettingsError(f"[{app}] unknown setting(s) {unknown}: check the spelling; {app} takes {top} "
                            f"(every key is listed with a comment in configs/{app}.yaml)")
    for key, setting in schema.items():
        if key not in flat:
            if setting.nullable:
                continue
            raise SettingsError(f"[{app}] setting {key!r} is missing (every key is listed in configs/{app}.yaml)")
        why = setting.problem(flat[key])
        if why:
            raise SettingsError(f"{key}={flat[key]!r} is invalid: {why}")


def check_model_family(model: Mapping, family: str, app: str, config_dir: str | Path) -> None:
    """A model config of another app (``model=digits`` in the FLUX app) fails with the ones that fit."""
    found = model.get("family")
    if found == family:
        return
    fitting = sorted(p.stem for p in Path(config_dir, "model").glob("*.yaml")
                     if f"family: {family}" in p.read_text())
    what = f"a {found} model config" if found else "not a model config of this project"
    raise SettingsError(f"the model config given to {app} is {what} (model.family={found!r}); {app} takes "
                        f"family {family!r}: model={'|'.join(fitting)}")
