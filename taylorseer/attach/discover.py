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
import inspect
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..core.config import CacheConfig
from ..perf.flops import count_flops
from ..perf.opcount import count_ops
from . import families, presets
from .attachment import block_lists
from .blocks import BlockSpec, Branch, LinearGate, TableGate
from .hooks import apply, remove
from .hooks import get_cache as taylorseer_cache

_CARRY = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "expand", "slice", "select", "clone",
          "contiguous", "_to_copy", "to", "alias", "detach", "flatten", "unflatten", "transpose", "t", "permute"}
_ACTIVATIONS = {"silu": "silu", "gelu": "gelu"}


@dataclass
class Mark:
    """One residual add of (an element of) a child's output."""

    role: str  # "gated" or "ungated"
    output: int | None = None  # element of a tuple output
    into: list[str] = field(default_factory=list)  # the stream(s) it adds into
    gate: str = ""  # where the gate comes from (JSON of its source, or why it is unknown)
    tokens: list[str] | None = None  # the streams whose tokens the output concatenates


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
        wanted = [c for c in self.children if c.role in ("gated", "ungated")] or [
            c for c in self.children if c.params and c.role != "-"]
        return [f"{self.path}.*.{c.name}" for c in wanted]


@dataclass
class Discovery:
    model: str
    preset: str | None
    lists: list[BlockList]
    costs: dict[str, dict] = field(default_factory=dict)  # per variant: forecast step / full step
    note: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for item in out["lists"]:
            item.pop("specs", None)
        return out


# ----------------------------------------------------------------------------------------------- tracing
@dataclass
class _Taint:
    child: str
    output: int | None
    gate: torch.Tensor | None = None
    part: tuple | None = None  # (start, stop) of a token slice


class _Tracer(TorchDispatchMode):
    """Follows block 0's children's outputs through the ops of its forward (see the module docstring)."""

    def __init__(self, block: torch.nn.Module, inputs: dict[int, str]):
        super().__init__()
        self.keep: list = []  # every tensor seen stays alive: ids are not reused during the trace
        self.taint: dict[int, _Taint] = {}
        self.streams: dict[int, tuple[str, ...]] = {k: (v,) for k, v in inputs.items()}
        self.inputs = dict(inputs)
        self.params = {id(p): n for n, p in block.named_parameters()}
        self.sources: dict[int, dict] = {}  # modulation provenance: kind, path, index, chunks, input, activation
        self.acts: dict[int, tuple[str | None, str, bool]] = {k: (None, v, False) for k, v in inputs.items()}
        self.linear_out: dict[int, str] = {}
        self.linear_in: dict[str, int] = {}
        self.found: dict[tuple, Mark] = {}  # (child, output element, token slice) -> its residual add
        self.inner: dict[str, str] = {}
        self.returns: str | tuple | None = None

    def mark(self, tensor, child: str, output: int | None):
        self.keep.append(tensor)
        self.taint[id(tensor)] = _Taint(child, output)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat_args = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        self.keep += flat_args + outs
        self._provenance(name, args, flat_args, outs)
        tainted = [a for a in flat_args if id(a) in self.taint]
        if tainted:
            self._follow(name, args, flat_args, tainted, outs)
        return out

    def _follow(self, name, args, flat_args, tainted, outs):
        clean = [a for a in flat_args if id(a) not in self.taint]
        if name == "mul" and len(tainted) == 2 and tainted[0].numel() != tainted[1].numel():
            # A child's output times another child's output: the broadcast one is a gate (norm1's gate_msa),
            # the token-shaped one the branch.
            branch, gate = sorted(tainted, key=lambda t: -t.numel())
            taint = self.taint[id(branch)]
            for o in outs:
                self.taint[id(o)] = _Taint(taint.child, taint.output, gate, taint.part)
            return
        taint = self.taint[id(tainted[0])]
        if name in _CARRY or name in ("split", "split_with_sizes", "chunk", "unbind"):
            part = taint.part
            if name == "slice" and len(args) >= 4 and args[1] == 1:
                part = (args[2], args[3])
            for o in outs:
                self.taint[id(o)] = _Taint(taint.child, taint.output, taint.gate, part)
        elif name == "mul" and len(tainted) == 1 and len(clean) == 1:
            for o in outs:
                self.taint[id(o)] = _Taint(taint.child, taint.output, clean[0], taint.part)
        elif name in ("add", "add_", "sub") and len(tainted) == 1 and len(clean) == 1 \
                and id(clean[0]) not in self.streams:
            for o in outs:  # arithmetic on the branch itself (a norm's "+ shift"): not yet a residual add
                self.taint[id(o)] = _Taint(taint.child, taint.output, taint.gate, taint.part)
        elif name in ("add", "add_") and len(tainted) == 1 and len(clean) == 1:
            streams = self.streams.get(id(clean[0])) or ()
            mark = self.found.setdefault((taint.child, taint.output, taint.part),
                                         Mark("gated" if taint.gate is not None else "ungated", taint.output))
            mark.into = list(dict.fromkeys(mark.into + list(streams)))
            if len(streams) > 1:
                mark.tokens = list(streams)
            elif streams and taint.part is not None:
                mark.tokens = self._tokens(streams[0], taint.part)
            if taint.gate is not None:
                mark.gate = self._gate(taint.gate)
            for o in outs:
                self.streams[id(o)] = streams
        else:
            for t in tainted:
                self.inner.setdefault(self.taint[id(t)].child, name)

    def _tokens(self, stream: str, part: tuple) -> list[str] | None:
        """A branch over cat(streams) sliced to ``stream``'s tokens: the order follows where the slice starts."""
        others = [s for s in dict.fromkeys(self.inputs.values()) if s != stream and "hidden" in s]
        if not others:
            return None
        start = part[0] or 0
        return [stream, others[0]] if start == 0 else [others[0], stream]

    def _provenance(self, name, args, flat_args, outs):
        streams = [self.streams[id(a)] for a in flat_args if id(a) in self.streams]
        if streams and (name in _CARRY or name in ("add", "cat", "float")):
            merged = tuple(s for group in streams for s in group) if name == "cat" else streams[0]
            for o in outs:
                self.streams[id(o)] = merged
        if name in _ACTIVATIONS and flat_args and id(flat_args[0]) in self.acts:
            _, source, cast = self.acts[id(flat_args[0])]
            for o in outs:
                self.acts[id(o)] = (name, source, cast)
        elif name in _CARRY and flat_args and id(flat_args[0]) in self.acts:
            activation, source, cast = self.acts[id(flat_args[0])]
            for o in outs:
                self.acts[id(o)] = (activation, source, cast or name == "_to_copy")
        params = [self.params[id(a)] for a in flat_args if id(a) in self.params]
        if params and name in _CARRY and len(flat_args) == 1:  # table[None]: still the table
            for o in outs:
                self.params[id(o)] = params[0]
        if name == "add" and params and len(flat_args) == 2:
            other = next(a for a in flat_args if id(a) not in self.params)
            _, source, cast = self.acts.get(id(other), (None, "?", False))
            for o in outs:
                self.sources[id(o)] = dict(kind="table", path=params[0], input=source, float32=cast)
        base = self.sources.get(id(flat_args[0])) if flat_args else None
        if base is not None and name in ("split", "split_with_sizes", "chunk", "unbind"):
            for i, o in enumerate(outs):
                self.sources[id(o)] = dict(base, index=i, chunks=len(outs))
        elif base is not None and name in _CARRY:
            for o in outs:
                self.sources[id(o)] = dict(base)

    def _gate(self, gate: torch.Tensor) -> str:
        source = self.sources.get(id(gate))
        if source is None or "index" not in source:
            return "computed in the block (describe it with a LinearGate/TableGate or keep the block's forward)"
        return json.dumps(source)


def trace_block(model: torch.nn.Module, block: torch.nn.Module, call) -> tuple[dict, dict[str, str]]:
    """Run ``call()`` (one model forward) and trace ``block``'s first forward: the children's roles."""
    names = list(inspect.signature(block.forward).parameters)
    state: dict = {}
    handles = []

    def pre(_module, args, kwargs):
        if "tracer" in state:
            return
        inputs = {}
        for i, value in enumerate(args):
            if isinstance(value, torch.Tensor) and i < len(names):
                inputs[id(value)] = names[i]
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                inputs[id(value)] = key
        tracer = state["tracer"] = _Tracer(block, inputs)
        tracer.keep += list(args) + list(kwargs.values())
        tracer.__enter__()

    def post(_module, args, kwargs, out):
        tracer = state.get("tracer")
        if tracer is not None and not state.get("done"):
            state["done"] = True
            tracer.__exit__(None, None, None)
            given = {names[i]: a for i, a in enumerate(args) if i < len(names)} | dict(kwargs)
            tracer.returns = _returned_streams(tracer, given, out)

    def child_hook(child_name):
        def hook(_module, _args, out):
            tracer = state.get("tracer")
            if tracer is None or state.get("done"):
                return
            if isinstance(out, torch.Tensor):
                tracer.mark(out, child_name, None)
            elif isinstance(out, (tuple, list)):
                for i, o in enumerate(out):
                    if isinstance(o, torch.Tensor):
                        tracer.mark(o, child_name, i)
        return hook

    def linear_hook(path):
        def hook(_module, args, out):
            tracer = state.get("tracer")
            if tracer is None or state.get("done") or not isinstance(out, torch.Tensor):
                return
            activation, source, _ = tracer.acts.get(id(args[0]), (None, "?", False))
            tracer.sources[id(out)] = dict(kind="linear", path=path, input=source, activation=activation)
        return hook

    handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(block.register_forward_hook(post, with_kwargs=True))
    for child_name, child in block.named_children():
        handles.append(child.register_forward_hook(child_hook(child_name)))
    for path, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(path)))
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
        if "tracer" in state and not state.get("done"):
            state["tracer"].__exit__(None, None, None)
    tracer = state.get("tracer")
    return (tracer.found, tracer.inner, tracer.returns) if tracer else ({}, {}, None)


def _returned_streams(tracer: _Tracer, given: dict, out):
    """What the block returns, as stream names: by derivation, else by the shape of an input stream."""
    def name_of(tensor):
        if tensor is None:
            return None
        streams = tracer.streams.get(id(tensor), ())
        if len(streams) == 1:
            return streams[0]
        same = [n for n, v in given.items() if isinstance(v, torch.Tensor) and v.shape == tensor.shape]
        return same[0] if same else "hidden_states"

    if isinstance(out, (tuple, list)):
        return tuple(name_of(o) if isinstance(o, torch.Tensor) or o is None else None for o in out)
    return name_of(out)


def _describe(children: list[Child], returns: str | None) -> tuple[BlockSpec | None, str]:
    """A BlockSpec from the marks, and its source text (None where a gate could not be traced)."""
    branches, texts = [], []
    for child in children:
        for mark in child.marks:
            gate, gate_text = None, "None"
            if mark.role == "gated":
                try:
                    source = json.loads(mark.gate)
                except ValueError:
                    return None, f"# {child.name}: the gate is {mark.gate}"
                if source["kind"] == "linear":
                    gate = LinearGate(source["path"], source["index"], source["chunks"], input=source["input"],
                                      activation=source.get("activation"))
                    gate_text = f"LinearGate({gate.linear!r}, {gate.index}, {gate.chunks}, input={gate.input!r})"
                else:
                    gate = TableGate(source["path"], source["index"], source["chunks"], input=source["input"],
                                     float32=bool(source.get("float32")))
                    gate_text = f"TableGate({gate.table!r}, {gate.index}, {gate.chunks}, input={gate.input!r})"
            tokens = tuple(mark.tokens) if mark.tokens else None
            for into in mark.into or ["hidden_states"]:
                branches.append(Branch(child.name, gate, into=into, output=mark.output, tokens=tokens))
                extra = "".join(f", {k}={v!r}" for k, v in (("into", into), ("output", mark.output),
                                                            ("tokens", tokens))
                                if v is not None and (k != "into" or v != "hidden_states"))
                texts.append(f"Branch({child.name!r}, {gate_text}{extra})")
    if not branches:
        return None, ""
    spec = BlockSpec(tuple(branches), returns=returns or "hidden_states")
    return spec, "BlockSpec(branches=(\n    " + ",\n    ".join(texts) + f",\n), returns={spec.returns!r})"


# ---------------------------------------------------------------------------------------------- discover
def discover(model: torch.nn.Module, inputs: dict | None = None, family: str | None = None) -> Discovery:
    """Blocks, children, branch marks and forecast-step costs of ``model`` (see the module docstring).

    ``inputs``: keyword arguments of one call (on the model's device; ``meta`` works). Known families get
    theirs from :func:`taylorseer.attach.families.inputs`.
    """
    found = presets.find(model)
    family = family or families.family_of(model)
    if inputs is None and family is not None:
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
    if inputs is not None:
        report.costs = _costs(model, inputs, lists, found)
    else:
        report.note = ("no inputs for this model: pass discover(model, inputs) in Python for the branch marks, the "
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


def _costs(model, inputs, lists: list[BlockList], found) -> dict[str, dict]:
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
    if found is not None or specs:
        variants["every block skipped (bound)"] = dict(skip_all=True, **({"blocks": specs} if not found else {}))
    costs: dict[str, dict] = {}
    for label, kwargs in variants.items():
        try:
            apply(model, config, num_steps=10, **kwargs)
        except (ValueError, TypeError) as err:
            costs[label] = dict(error=str(err))
            continue
        try:
            with torch.no_grad():
                full_flops = count_flops(lambda: model(**inputs))
                forecast_flops = count_flops(lambda: model(**inputs))
                taylorseer_cache(model).reset()
                full = count_ops(lambda: model(**inputs))
                forecast = count_ops(lambda: model(**inputs))
        except RuntimeError as err:
            costs[label] = dict(error=str(err))
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


def main(argv=None) -> Discovery:
    parser = argparse.ArgumentParser(prog="python -m taylorseer.attach.discover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="diffusers class name, module:Class, or a pipeline/transformer folder")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        model = load_meta(args.source)
        report = discover(model)
    except (ValueError, TypeError, ImportError) as err:
        print(f"[discover] error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return report


if __name__ == "__main__":
    main()
