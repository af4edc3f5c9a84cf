"""The core's import structure: layers that only import downward, no circle, no function-local import.

    core     the cache's mathematics          imports nothing else of taylorseer
    perf     FLOPs, op counts, compile, ...   imports core
    harness  run folders, settings, launch    imports core
    attach   descriptions, hooks, presets     imports core and perf
    __init__ the public API                   imports anything

Every import counts, wherever it stands in a file (a function-local import that dodges a circle is the
sign of a function in the wrong layer, so the walk below does not skip them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "taylorseer"
LAYERS = {"core": set(), "perf": {"core"}, "harness": {"core"}, "attach": {"core", "perf"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported taylorseer module, line, at module level) for every import in the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "taylorseer" or target.startswith("taylorseer."):
                found.append((target, node.lineno, id(node) in top))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer():
    loose = [m for m in _modules() if m != "taylorseer" and _layer(m) is None]
    assert not loose, f"modules outside core/perf/harness/attach: {loose}"


def test_imports_only_go_down_and_stay_at_module_level():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if name == "taylorseer":
            continue
        layer = _layer(name)
        for target, line, at_top in _imports(name, path):
            target_layer = _layer(target)
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
            if target == "taylorseer" or (target_layer is None and target in modules):
                wrong.append(f"{where} (the public API: import the module it comes from)")
            elif target_layer is not None and target_layer != layer and target_layer not in LAYERS[layer]:
                wrong.append(f"{where} ({layer} may import {sorted(LAYERS[layer]) or 'nothing else'})")
            elif not at_top and target in modules:
                wrong.append(f"{where} inside a function (a function-local import dodges a layer or a circle)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_inside_a_layer():
    modules = _modules()
    edges = {m: {t for t, _, _ in _imports(m, p) if t in modules and t != m and not modules[t].name == "__init__.py"}
             for m, p in modules.items() if m != "taylorseer"}

    def reaches(start: str, goal: str, seen: set) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    circles = sorted(m for m in edges if reaches(m, m, set()))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("name", ["CacheConfig", "ForecastCache", "FlopsReport", "apply", "remove", "get_cache",
                                  "summary", "presets", "BlockSpec", "Branch", "LinearGate", "TableGate",
                                  "full_steps", "compression", "is_full_step", "count_flops", "count_schedule",
                                  "compile", "uncompile"])
def test_public_api_names(name):
    import taylorseer

    assert name in taylorseer.__all__ and getattr(taylorseer, name) is not None
