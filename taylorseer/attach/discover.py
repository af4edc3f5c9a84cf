"""What to cache in a transformer: its blocks, their children as ready patterns, the residual branches, the cost.

    python -m taylorseer.attach.discover WanTransformer3DModel    # a diffusers class at its default size (meta)
    python -m taylorseer.attach.discover /data/Wan2.1-T2V-1.3B-Diffusers  # a pipeline or transformer folder
    python -m taylorseer.attach.discover my_package.models:MyDiT --json

For every list of blocks it prints block 0's children with their share of the block's parameters, and,
where the model can be run (a known family's inputs, or ``discover(model, inputs)`` in Python), traces
block 0 on the ``meta`` device to mark each child: a *gated residual branch* (``x + gate * child(...)``, with
the gate's source: rows of a Linear modulation or of a table), an *ungated residual branch* (``x +
child(...)``: cross-attention), or an inner module. From the marks it writes a block description
(:class:`taylorseer.BlockSpec`) and counts with FlopCounterMode what a forecast step still costs
against a full step, with the family preset, with the description, and with every block skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.config import CacheConfig
from ..perf.flops import count_flops
from ..perf.opcount import count_ops
from . import autobuild, families, presets, tiny
from .attachment import block_lists
from .blocks import BlockSpec
from .hooks import apply, remove, summary
from .hooks import get_cache as taylorseer_cache
from .trace import _ACTIVATIONS, _CARRY, Mark, _describe, _returned_streams, _Taint, _Tracer, trace_block  # noqa: F401


@dataclass
class Child:
    name: str
    cls: str
    params: int
    share: float  # of the block's parameters
    role: str = "?"  # "gated", "ungated", "inner", "-" (no parameters, not traced) or "?" (not traced)
    marks: list[Mark] = field(default_factory=list)


@dataclass
class BlockList:
    path: str
    count: int
    cls: str
    share: float  # of the model's parameters
    children: list[Child]
    descriptions: list[tuple[list[int], str]] = field(default_factory=list)  # (block indices, BlockSpec text)
    specs: dict[str, BlockSpec] = field(default_factory=dict, repr=False)  # block name -> traced description

    @property
    def patterns(self) -> list[str]:
        def work(c):  # norms and modules below 2% of the block carry no real work
            return "norm" not in c.cls.lower() and "norm" not in c.name.lower() and c.share >= 0.02

        wanted = [c for c in self.children if c.role in ("gated", "ungated") and work(c)] or [
            c for c in self.children if c.params and c.role != "-" and work(c)]
        return [f"{self.path}.*.{c.name}" for c in wanted]


@dataclass
class Discovery:
    model: str
    preset: str | None
    lists: list[BlockList]
    costs: dict[str, dict] = field(default_factory=dict)  # per variant: forecast step / full step
    note: str = ""
    verification: list[str] = field(default_factory=list)  # apply()'s derived paths, verified on the first step

    def to_dict(self) -> dict:
        out = asdict(self)
        for item in out["lists"]:
            item.pop("specs", None)
        return out


# ---------------------------------------------------------------------------------------------- discover
def discover(model: torch.nn.Module, inputs: dict | None = None, family: str | None = None) -> Discovery:
    """Blocks, children, branch marks and forecast-step costs of ``model`` (see the module docstring).

    ``inputs``: keyword arguments of one call (on the model's device; ``meta`` works). Known families get
    theirs from :func:`taylorseer.attach.families.inputs`.
    """
    found = presets.find(model)
    family = family or families.family_of(model)
    on_meta = next(iter(model.parameters())).device.type == "meta"
    needs_values = family is not None and on_meta and families.count_device(family) != "meta"
    if inputs is None and family is not None and not needs_values:
        # 1024 image tokens (patch 2), 4 latent frames for video, 128 text tokens: sizes where a forecast
        # step's traffic is the features', not the weights' (shapes only on the meta device: free)
        inputs = families.inputs(family, model, height=64, width=64, frames=4, text_tokens=128)
    total = sum(p.numel() for p in model.parameters()) or 1
    lists = []
    for path, blocks in block_lists(model):
        block = blocks[0]
        block_params = sum(p.numel() for p in block.parameters()) or 1
        children = []
        for name, child in block.named_children():
            params = sum(p.numel() for p in child.parameters())
            children.append(Child(name, type(child).__name__, params, params / block_params,
                                  role="?" if params else "-"))
        item = BlockList(path, len(blocks), type(block).__name__,
                         sum(p.numel() for p in blocks.parameters()) / total, children)
        lists.append(item)
        if inputs is not None and "." not in path:  # nested lists (a text refiner) run outside the main loop
            _trace_list(model, path, blocks, item, lambda: model(**inputs))
    report = Discovery(type(model).__name__, found.name if found else None, lists)
    real = inputs is not None and not on_meta
    if real and found is None:
        report.verification = _verify_apply(model, inputs)
    if inputs is not None:
        report.costs = _costs(model, inputs, lists, found, derive=real and found is None)
    elif needs_values:
        report.note = (f"not traced: a {family} model's forward reads its inputs' values, which the meta device has "
                       f"none of; save one call's keyword arguments as inputs.pt in its folder, or pass "
                       f"discover(model, inputs) with real tensors")
    else:
        report.note = ("no inputs for this model: save one call's keyword arguments as inputs.pt in its folder, or "
                       "pass discover(model, inputs) in Python for the branch marks, the "
                       "description and the forecast-step cost")
    return report


def _trace_list(model, path: str, blocks, item: BlockList, call) -> None:
    """Trace the first block of every distinct layout (same children) in the list; describe each layout."""
    layouts: dict[tuple[str, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        layouts.setdefault(tuple(n for n, _ in block.named_children()), []).append(i)
    for indices in layouts.values():
        block = blocks[indices[0]]
        marks, inner, returns = trace_block(model, block, call)
        children = item.children if indices[0] == 0 else [
            Child(n, type(c).__name__, 0, 0.0) for n, c in block.named_children()]
        for child in children:
            child.marks = [m for key, m in marks.items() if key[0] == child.name]
            if child.marks:
                child.role = "gated" if any(m.role == "gated" for m in child.marks) else "ungated"
            elif child.name in inner:
                child.role = "inner"
        spec, text = _describe(children, returns)
        if text:
            item.descriptions.append((indices, text))
        if spec is not None:
            item.specs.update({f"{path}.{i}": spec for i in indices})


def _verify_apply(model, inputs) -> list[str]:
    """What ``taylorseer.apply(model, config)`` with no description does: each layout's path, verified."""
    apply(model, CacheConfig(interval=2, max_order=1, first_enhance=1), num_steps=2)
    try:
        with torch.no_grad():
            model(**inputs)
            model(**inputs)  # a forecast step on the verified paths
        return summary(model).derivation.lines()
    except Exception as err:  # noqa: BLE001 - reported in the summary, the report goes on
        return [f"the forecast step failed: {type(err).__name__}: {err}"]
    finally:
        remove(model)


def _costs(model, inputs, lists: list[BlockList], found, derive: bool = False) -> dict[str, dict]:
    """A forecast step against a full step (FLOPs, bytes, kernels) with the preset, the traced description,
    the marked branches as plain modules, and every block skipped."""

    config = CacheConfig(interval=2, max_order=1, first_enhance=1)  # step 0 full, step 1 a forecast
    variants = {}
    if found is not None:
        variants["preset"] = dict(preset=found)
    specs = {name: spec for item in lists for name, spec in item.specs.items()}
    if specs:
        variants["description"] = dict(blocks=specs)
    patterns = [p for item in lists for p in item.patterns
                if any(c.role in ("gated", "ungated") for c in item.children)]
    if patterns:
        variants["plain modules"] = dict(modules=patterns)
    if derive:
        variants["apply() (derived, verified)"] = {}
    if found is not None or specs or derive:
        variants["every block skipped (bound)"] = dict(skip_all=True, **({"blocks": specs} if specs and not found
                                                                           and not derive else {}))
    costs: dict[str, dict] = {}
    for label, kwargs in variants.items():
        try:
            apply(model, config, num_steps=10, **kwargs)
        except (ValueError, TypeError) as err:
            costs[label] = dict(error=str(err))
            continue
        try:
            with torch.no_grad():
                if derive:  # the first call derives and verifies (extra forwards): count from a fresh call
                    model(**inputs)
                    taylorseer_cache(model).reset()
                full_flops = count_flops(lambda: model(**inputs))
                forecast_flops = count_flops(lambda: model(**inputs))
                taylorseer_cache(model).reset()
                full = count_ops(lambda: model(**inputs))
                forecast = count_ops(lambda: model(**inputs))
        except Exception as err:  # noqa: BLE001 - a candidate that breaks the model is reported, not fatal
            costs[label] = dict(error=f"{type(err).__name__}: {err}")
            continue
        finally:
            remove(model)
        costs[label] = dict(flops=forecast_flops / full_flops, bytes=forecast.bytes / full.bytes,
                            kernels=forecast.kernels, full_kernels=full.kernels)
    return costs


def format_report(report: Discovery) -> str:
    lines = [f"{report.model}" + (f" (preset: {report.preset})" if report.preset else " (no preset)")]
    for item in report.lists:
        lines.append(f"\n{item.path}: {item.count} x {item.cls} ({100 * item.share:.1f}% of the parameters)")
        lines.append(f"  {'child':<16} {'class':<28} {'params':>12} {'share':>7}  role")
        for c in item.children:
            role = {"gated": "gated residual branch", "ungated": "ungated residual branch", "inner": "inner (feeds "
                    "another child)", "-": "-", "?": "not traced"}[c.role]
            if c.marks:
                role = ""
            lines.append(f"  {c.name:<16} {c.cls:<28} {c.params:>12,} {100 * c.share:>6.1f}%  {role}".rstrip())
            for m in c.marks:
                text = "gated residual branch" if m.role == "gated" else "ungated residual branch"
                text += f" -> {', '.join(m.into)}" + (f" (output {m.output})" if m.output is not None else "")
                text += f" over cat{tuple(m.tokens)}" if m.tokens else ""
                if m.gate:
                    text += f"; gate: {_gate_text(m.gate)}"
                lines.append(f"  {'':<16} {text}")
        lines.append("  patterns: " + "  ".join(item.patterns))
        for indices, text in item.descriptions:
            which = "every block" if len(item.descriptions) == 1 else f"blocks {_ranges(indices)}"
            lines.append(f"  description ({which}):\n    " + text.replace("\n", "\n    "))
    if report.costs:
        lines.append("\na forecast step against a full step (FlopCounterMode; bytes and kernels: perf.opcount):")
        for label, cost in report.costs.items():
            if "error" in cost:
                lines.append(f"  {label:<28} cannot attach: {cost['error']}")
            else:
                lines.append(f"  {label:<28} FLOPs {100 * cost['flops']:6.2f}%   bytes {100 * cost['bytes']:6.2f}%   "
                             f"kernels {cost['kernels']} of {cost['full_kernels']}")
    if report.verification:
        lines.append("\ntaylorseer.apply(model, config) with no description, verified on the first step:")
        lines += [f"  {line}" for line in report.verification]
    if report.note:
        lines.append(f"\n{report.note}")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices) if len(indices) < 4 else f"{indices[0]}..{indices[-1]}"


def _gate_text(gate: str) -> str:
    try:
        source = json.loads(gate)
    except ValueError:
        return gate
    if source["kind"] == "linear":
        act = f"{source.get('activation')}(" if source.get("activation") else "("
        return f"chunk {source['index']} of {source['chunks']} of {source['path']}({act}{source['input']}))"
    return f"chunk {source['index']} of {source['chunks']} of {source['path']} + {source['input']}"


# --------------------------------------------------------------------------------------------------- CLI
def load_meta(source: str) -> torch.nn.Module:
    """A transformer with shapes only: a diffusers class name (default config), ``module:Class``, or a folder
    holding a ``config.json`` (a transformer) or a ``model_index.json`` (a pipeline: its ``transformer``)."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path / "transformer" if (path / "model_index.json").is_file() else path
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{source}: no config.json (expected a transformer folder or a pipeline folder with "
                             f"model_index.json and transformer/config.json)")
        config = json.loads(config_file.read_text())
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise ValueError(f"{config_file}: _class_name={config.get('_class_name')!r} is not a diffusers class")
        with torch.device("meta"):
            return cls.from_config(config).eval()
    if ":" in source:
        module_name, _, cls_name = source.partition(":")
        cls = getattr(importlib.import_module(module_name), cls_name)
    else:
        import diffusers

        cls = getattr(diffusers, source, None)
        if cls is None:
            raise ValueError(f"{source!r} is neither a folder nor a diffusers class; give a folder with config.json, "
                             f"a class name such as WanTransformer3DModel, or module:Class")
    with torch.device("meta"):
        return cls().eval()


def load(source: str) -> tuple[torch.nn.Module, dict | None]:
    """The model to discover and one call's inputs: a folder with ``inputs.pt`` (``torch.save`` of one call's
    keyword arguments) loads the real transformer; a class with a known small instance
    (:mod:`taylorseer.attach.tiny`) builds it with random weights and inputs; a benchmark family is traced at
    its default size on the meta device; any other diffusers class gets a small instance and inputs found by
    :mod:`taylorseer.attach.autobuild`, or, where none are found, is listed from its shapes only."""
    path = Path(source).expanduser()
    if path.exists():
        folder = path / "transformer" if (path / "model_index.json").is_file() else path
        if (folder / "inputs.pt").is_file():
            import diffusers

            config = json.loads((folder / "config.json").read_text())
            cls = getattr(diffusers, config.get("_class_name", ""), None)
            if cls is None:
                raise ValueError(f"{folder}: _class_name={config.get('_class_name')!r} is not a diffusers class")
            return cls.from_pretrained(str(folder)).eval(), torch.load(folder / "inputs.pt", weights_only=False)
    elif tiny.find(source) is not None:
        model, call = tiny.build(source)
        return model, call(500.0)
    elif ":" not in source and families.family_of(load_meta(source)) is None:
        # any other diffusers class: a small instance and inputs found by running it (autobuild)
        try:
            model, call = autobuild.build(source)
            print(f"[discover] {source}: a small random instance, inputs found by autobuild "
                  f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in call(500.0).items() if torch.is_tensor(v))})",
                  file=sys.stderr)
            return model, call(500.0)
        except autobuild.AutobuildError as err:
            print(f"[discover] {err}; listing it from its shapes only", file=sys.stderr)
    return load_meta(source), None


def main(argv=None) -> Discovery:
    parser = argparse.ArgumentParser(prog="python -m taylorseer.attach.discover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="diffusers class name, module:Class, or a pipeline/transformer folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not args.source.strip():
        parser.error("source is empty: give a diffusers class name, module:Class, or a folder")
    try:
        model, inputs = load(args.source)
        report = discover(model, inputs)
    except (ValueError, TypeError, ImportError) as err:
        print(f"[discover] error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return report


if __name__ == "__main__":
    main()
