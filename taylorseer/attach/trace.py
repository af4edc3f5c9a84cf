"""Which children of a block are its residual branches: a dispatch-level trace of one block call.

:class:`_Tracer` follows each child's output through the ops of the block's forward and marks the residual
adds it reaches (gated or not, the gate's source: rows of a Linear modulation or of a table); :func:`_describe`
writes a :class:`~taylorseer.attach.spec.BlockSpec` from the marks. Used by :mod:`taylorseer.attach.discover`
(the command) and :mod:`taylorseer.attach.derive` (descriptions derived and verified at the first step).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .spec import BlockSpec, Branch, LinearGate, TableGate

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


def _describe(children: list, returns: str | None) -> tuple[BlockSpec | None, str]:
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
