"""Count what a call dispatches: aten ops and the bytes they read and write (a TorchDispatchMode).

Wall time on a shared machine is noise; a forecast step's cost is its kernels and its memory traffic,
which this counts exactly and reproducibly (CPU, CUDA or meta tensors alike):

    ops = count_ops(lambda: model(**inputs))
    ops.total, ops.bytes, ops.counts["aten.addcmul.default"]

Bytes are the sizes of every tensor argument and result of a non-view op (a view moves nothing): an
upper bound on the traffic (caches and fusion lower it), the same for the variants being compared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class OpCount:
    counts: Counter = field(default_factory=Counter)  # op name -> calls
    views: Counter = field(default_factory=Counter)  # the view ops among them (no data moved)
    bytes: int = 0  # bytes of the arguments and results of non-view ops

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def kernels(self) -> int:
        """Ops that move data (views excluded): what launches a kernel."""
        return self.total - sum(self.views.values())


_VIEWS = {"view", "_unsafe_view", "slice", "select", "unsqueeze", "squeeze", "expand", "t", "transpose", "permute",
          "as_strided", "split", "split_with_sizes", "chunk", "unbind", "narrow", "reshape", "alias", "detach",
          "unflatten", "flatten", "view_as", "expand_as", "lift_fresh", "_reshape_alias"}


class _Counter(TorchDispatchMode):
    def __init__(self, result: OpCount):
        super().__init__()
        self.result = result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.result.counts[name] += 1
        if func.overloadpacket.__name__ in _VIEWS:
            self.result.views[name] += 1
        else:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.result.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count_ops(fn: Callable[[], object]) -> OpCount:
    """The aten ops ``fn`` dispatches, by name, and the bytes they touch."""
    result = OpCount()
    with _Counter(result):
        fn()
    return result
