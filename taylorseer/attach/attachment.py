"""What an attachment wrapped and the memory its cache holds; the block lists and children of a model.

``taylorseer.summary(model).describe()`` after ``apply``::

    WanTransformer3DModel, preset wan: 30 blocks with a forecast-step forward, 90 cached features
    (blocks.0.attn1, blocks.0.attn2, blocks.0.ffn, ...); factors per context at order 1: 1.42 GB

The factor bytes are known once a full step has run (the features' shapes come from the inputs): a
context holds ``(O+1)`` factors of every recorded feature at steady state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The ``ModuleList``s of blocks (elements with children), outermost only, largest first."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not len(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # inside a block of an outer list (a feed-forward's layers)
        if all(len(list(m.children())) for m in module):
            found.append((name, module))
    return sorted(found, key=lambda item: -sum(p.numel() for p in item[1].parameters()))


def children_hint(model: torch.nn.Module, limit: int = 3) -> str:
    """One line naming the model's block lists and the children of each list's block 0."""
    lists = block_lists(model)[:limit]
    if not lists:
        names = [n for n, _ in model.named_children()]
        return f"{type(model).__name__} has no list of blocks; its children are {names}"
    parts = []
    for name, blocks in lists:
        children = ", ".join(n for n, _ in blocks[0].named_children())
        parts.append(f"{name} ({len(blocks)} x {type(blocks[0]).__name__}): {name}.0 has {children}")
    return "Blocks of this model: " + "; ".join(parts) + " (cache children one level down, e.g. " \
        f"'{lists[0][0]}.*.<child>')"


@dataclass
class AttachSummary:
    """What :func:`taylorseer.apply` installed."""

    model: str
    preset: str | None
    short_blocks: list[str]  # blocks with a forecast-step forward
    plain_blocks: list[str]  # described blocks that keep their own forward
    keys: list[str]  # features recorded on full steps
    modules: list[str]  # plain cached modules (modules=...)
    overrides: list[str]
    skip_all: bool = False
    cache: object = field(default=None, repr=False)
    derivation: object = field(default=None, repr=False)  # derive.Derivation: blocks without a description
    others: list = field(default_factory=list, repr=False)  # the summaries of a pipeline's other denoisers

    @classmethod
    def collect(cls, model, cache, preset, specs: dict, keys, modules, overrides, skip_all) -> AttachSummary:
        short = [n for n, s in specs.items() if s.short]
        plain = [n for n, s in specs.items() if not s.short]
        return cls(type(model).__name__, preset, short, plain, list(keys), list(modules), list(overrides), skip_all,
                   cache)

    def feature_bytes(self) -> dict[str, int]:
        """Per context: bytes of one factor of every recorded feature (known after a full step)."""
        out = {}
        for name, ctx in self.cache._contexts.items():
            total = sum(s.tensors[0].nbytes  # a tensor, or an 8-bit factor with its scales
                        for states in ctx.states.values() for s in states if s.tensors)
            if total:
                out[name] = total
        return out

    def projected_nbytes(self) -> int | None:
        """What the factors will hold at steady state, ``(O+1)`` factors per feature and context seen so far."""
        per_context = self.feature_bytes()
        if not per_context:
            return None
        return (self.cache.config.max_order + 1) * sum(per_context.values())

    def describe(self) -> str:
        head = f"{self.model}" + (f", preset {self.preset}" if self.preset else "")
        parts = []
        if self.skip_all:
            parts.append(f"{len(self.short_blocks)} blocks skipped on forecast steps (the bound; nothing cached)")
        else:
            if self.derivation is not None:
                parts.append("no preset: each block layout's path derived and verified on the first step")
            if self.short_blocks:
                parts.append(f"{len(self.short_blocks)} blocks with a forecast-step forward")
            if self.plain_blocks:
                parts.append(f"{len(self.plain_blocks)} blocks running their own forward with forecast modules")
            shown = ", ".join(self.keys[:4]) + (", ..." if len(self.keys) > 4 else "")
            parts.append(f"{len(self.keys)} cached features ({shown})")
            if self.overrides:
                parts.append(f"{len(self.overrides)} overridden modules")
        projected = self.projected_nbytes()
        memory = ("factor bytes known after the first full step" if projected is None else
                  f"factors at order {self.cache.config.max_order}: {projected / 1e9:.3f} GB "
                  f"over {len(self.feature_bytes())} context(s)")
        text = f"{head}: " + ", ".join(parts) + f"; {memory}"
        collapser = getattr(self.cache, "collapser", None)
        line = collapser.describe() if collapser is not None and not self.skip_all else None
        if line:
            text += f"\n  {line}"
        if self.derivation is not None:
            text += "".join(f"\n  {line}" for line in self.derivation.lines())
        return text + "".join(f"\n{other.describe()}" for other in self.others)
