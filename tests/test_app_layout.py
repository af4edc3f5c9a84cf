"""The model folders have one shape: the same files for the same jobs, the same names for the same roles.

    sample.py      the Hydra app that samples (``main(cfg)`` runs it, ``cli()`` is the command)
    pipeline.py    load the model (weights, VAE) and sample with it
    cache.py       what is cached: ``attach_cache`` and ``cached_module_names``, both from the core's preset
    flops.py       FLOPs of a run (``count_run_flops``, meta device: no weights)
    calibrate.py   the calibration file of ``cache.schedule=calibrated`` (``main(cfg)``, ``cli()``)
    digits.py      where a model is bundled: that model (data, architecture, training; ``main(argv)`` trains it)

Read from the source (no imports), so the check is instant.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from taylorseer.attach import presets

ROOT = Path(__file__).resolve().parents[1]
APPS = {"TaylorSeer-DiT": "dit", "TaylorSeer-FLUX": "flux", "TaylorSeer-HunyuanVideo": "hunyuan_video"}
BUNDLED = ("TaylorSeer-DiT", "TaylorSeer-FLUX")
ROLES = {
    "sample.py": {"main", "cli"},
    "pipeline.py": set(),
    "cache.py": {"attach_cache", "cached_module_names", "PRESET"},
    "flops.py": {"count_run_flops"},
    "calibrate.py": {"main", "cli"},
}


def _names(path: Path) -> set[str]:
    """Functions, classes and assigned names at the top level of a file."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("folder", list(APPS))
def test_every_model_folder_has_the_same_files_and_names(folder):
    for file, names in ROLES.items():
        path = ROOT / folder / file
        assert path.is_file(), f"{folder}/{file} is missing"
        missing = names - _names(path)
        assert not missing, f"{folder}/{file} lacks {sorted(missing)}"
    if folder in BUNDLED:
        assert {"main", "train", "TrainConfig"} <= _names(ROOT / folder / "digits.py"), folder


@pytest.mark.parametrize("folder", list(APPS))
def test_one_name_per_role_and_no_second_list_of_cached_modules(folder):
    for path in (ROOT / folder).glob("*.py"):
        names = _names(path)
        old = names & {"_cli", "attach", "apply_flux_cache", "CACHED_MODULES", "DOUBLE_MODULES", "MODULES",
                       "module_patterns", "meta_flops", "count_flux_flops", "_dtype_keyword"}
        assert not old, f"{path.relative_to(ROOT)} still defines {sorted(old)}"
        # The cached modules come from the preset: no fnmatch pattern of block children written out here.
        patterns = [n.value for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and ".*." in n.value]
        assert not patterns, f"{path.relative_to(ROOT)} writes out module patterns {patterns}"
    preset = ast.parse((ROOT / folder / "cache.py").read_text())
    values = [n.value.value for n in preset.body if isinstance(n, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "PRESET" for t in n.targets)]
    assert values == [APPS[folder]] and APPS[folder] in presets.NAMES
