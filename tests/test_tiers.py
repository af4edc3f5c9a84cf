"""The fast tier keeps its promise (tests/conftest.py, scripts/test.sh): every module of taylorseer/ and of every
app folder is imported by a fast-tier test, the tests that stand for exactness, schedules, errors and one short
sampling per app stay in it, and the full-tier list names only tests that exist.

"Imported by a fast-tier test": a module a fast test imports (in its own body, or at the top of its file or of a
tests/ helper that file imports, or in the file's fixtures and helpers), runs (``python -m <module>``, a
``scripts/*.sh`` that does) or names (a Hydra ``_target_``), plus everything those modules import in turn (the
static import graph: what Python really loads). Read without running anything but a ``--collect-only``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FULL_TIER, SERIAL

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Tests that stand for what the fast tier must cover (the list): each must exist and be fast.
MUST_STAY_FAST = {
    "one short sampling per app": [
        "tests/test_dit.py::test_sample_app_end_to_end",
        "tests/test_flux.py::test_sample_app_end_to_end_and_resume",
        "tests/test_hunyuan_video.py::test_hydra_app_writes_videos_and_metrics_and_resumes",
    ],
    "exactness": [
        "tests/test_forecast.py",
        "tests/test_dit.py::test_interval_one_sampling_is_bit_identical",
        "tests/test_flux.py::test_interval_1_is_bit_identical",
        "tests/test_hunyuan_video.py::test_interval_one_is_bit_identical_to_no_cache",
        "tests/test_flux.py::test_remove_restores_the_model",
    ],
    "schedules": [
        "tests/test_schedule_and_config.py",
        "tests/test_schedule_policies.py::test_budget_rule_places_exactly_k_steps_denser_at_the_end",
        "tests/test_schedule_policies.py::test_adaptive_computes_when_the_probe_forecast_fails_and_at_the_gap_bound",
        "tests/test_dit.py::test_real_sampling_loop_follows_the_paper_schedule",
    ],
    "errors": [
        "tests/test_dit.py::test_bad_settings_fail_before_any_model_is_loaded",
        "tests/test_flux.py::test_sample_app_clear_errors_write_nothing",
        "tests/test_hunyuan_video.py::test_bad_settings_fail_before_loading_with_one_clear_line",
        "tests/test_schedule_policies.py::test_bad_policy_settings_name_the_field_and_the_fix",
    ],
}

@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict[str, bool]:
    """Every test's node id -> whether it is in the fast tier (neither slow nor gpu), as pytest collects them."""
    tmp_path = tmp_path_factory.mktemp("tiers")
    script = tmp_path / "collect.py"
    script.write_text(
        "import json, sys\nimport pytest\n\n"
        "class Record:\n"
        "    fast = {}\n\n"
        "    @pytest.hookimpl(trylast=True)\n"
        "    def pytest_collection_modifyitems(self, items):\n"
        "        Record.fast = {i.nodeid: not any(i.iter_markers('slow')) and not any(i.iter_markers('gpu'))\n"
        "                       for i in items}\n\n"
        "code = pytest.main(['--collect-only', '-q', '-m', '', '-p', 'no:xdist', '-p', 'no:cacheprovider', 'tests'],\n"
        "                   plugins=[Record()])\n"
        "json.dump(Record.fast, open(sys.argv[1], 'w'))\n"
        "sys.exit(int(code))\n")
    out = tmp_path / "items.json"
    result = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


# ---- the project's modules and what imports what ----------------------------------------------------------------
PACKAGES = ["taylorseer", "taylorseer_dit", "taylorseer_flux", "taylorseer_hunyuan_video", "taylorseer_eval"]


def _modules() -> dict[str, Path]:
    """Every module of the core and the app folders: dotted name -> file (a package is its ``__init__.py``)."""
    out = {}
    for package in PACKAGES:
        folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])  # TaylorSeer-FLUX/, ...
        for path in folder.rglob("*.py"):
            parts = (package, *path.relative_to(folder).with_suffix("").parts)
            out[".".join(parts).removesuffix(".__init__")] = path
    return out


MODULE_NAME = re.compile(r"(?<![\w.])((?:taylorseer\w*)(?:\.\w+)*)")


def _resolve(dotted: str, modules) -> list[str]:
    """The project modules that importing or naming ``dotted`` loads: its longest module prefix and the packages
    above it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return [".".join(parts[:k]) for k in range(1, n + 1) if ".".join(parts[:k]) in modules]
    return []


def _named(nodes, package: str | None) -> set[str]:
    """Dotted names imported, run or named under the AST ``nodes`` (relative imports resolved in ``package``)."""
    found = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level and package:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.update(MODULE_NAME.findall(node.value))
                if node.value.endswith(".sh") and (ROOT / "scripts" / Path(node.value).name).is_file():
                    found.update(MODULE_NAME.findall((ROOT / "scripts" / Path(node.value).name).read_text()))
    return found


# What runs a module as a file, not through an import (edges the static graph cannot see): the metric runners run
# in the metric's own environment, `<env python> eval/runners/run_<metric>.py` (eval/external.py).
RUN_AS_FILES = {"taylorseer_eval.external": ["taylorseer_eval.runners.run_imagereward",
                                             "taylorseer_eval.runners.run_vbench"]}


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        named = _named([ast.parse(path.read_text())], package)
        named |= {f"{package}.{n}" for n in named}  # a script's import of its sibling (`from _protocol import`)
        graph[name] = {m for d in named for m in _resolve(d, modules)} | set(RUN_AS_FILES.get(name, ()))
    return graph


def _helpers_of(tree: ast.Module) -> list[Path]:
    """The tests/ helper modules (tiny_flux.py, ...) a test file imports."""
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    return [TESTS / f"{n}.py" for n in sorted(names) if (TESTS / f"{n}.py").is_file() and n != "conftest"]


def _fast_names(fast: dict[str, bool]) -> set[str]:
    """Dotted names the fast-tier tests import, run or name."""
    by_file: dict[str, set[str]] = {}
    for nodeid, is_fast in fast.items():
        if is_fast:
            path, *rest = nodeid.split("::")
            by_file.setdefault(path, set()).add(re.sub(r"\[.*$", "", rest[-1]))
    names, helpers = set(), set()
    for path, tests in by_file.items():
        tree = ast.parse((ROOT / path).read_text())
        for node in tree.body:
            is_test = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
            is_test_class = isinstance(node, ast.ClassDef) and node.name.startswith("Test")
            if is_test_class:
                node_tests = [n for n in node.body if getattr(n, "name", "") in tests]
                names |= _named(node_tests, None)
            elif not is_test or node.name in tests:  # fixtures, helpers, module-level code; fast tests
                names |= _named([node], None)
        helpers.update(_helpers_of(tree))
    seen = set()
    while helpers - seen:  # helpers import helpers (tiny_pipelines -> tiny_flux)
        helper = sorted(helpers - seen)[0]
        seen.add(helper)
        tree = ast.parse(helper.read_text())
        names |= _named([tree], None)
        helpers.update(_helpers_of(tree))
    return names


def test_every_module_is_imported_by_a_fast_test(collected):
    modules = _modules()
    graph = _import_graph(modules)
    reached = {m for name in _fast_names(collected) for m in _resolve(name, modules)}
    todo = list(reached)
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    missing = sorted(m for m in modules if m not in reached)
    assert not missing, (
        "modules no fast-tier test imports (directly or through the modules it imports): "
        f"{[str(modules[m].resolve().relative_to(ROOT)) for m in missing]} -- keep a short test of each in the fast "
        "tier (tests/conftest.py FULL_TIER)")


def test_the_tests_that_stand_for_the_fast_tier_stay_in_it(collected):
    fast = collected
    problems = []
    for what, entries in MUST_STAY_FAST.items():
        for entry in entries:
            matched = [n for n in fast if n == entry or n.startswith((entry + "::", entry + "["))]
            if not matched:
                problems.append(f"{entry} ({what}): no such test (renamed? update tests/test_tiers.py)")
            elif not all(fast[n] for n in matched):
                problems.append(f"{entry} ({what}): in the full tier only; the fast tier must keep it")
    for name, entries in (("FULL_TIER", FULL_TIER), ("SERIAL", SERIAL)):
        for entry in entries:
            if not any(n == entry or n.startswith((entry + "::", entry + "[")) for n in fast):
                problems.append(f"tests/conftest.py {name} names {entry}, which is not a test (renamed?)")
    assert not problems, "\n".join(problems)
