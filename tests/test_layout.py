"""The library and the program are apart: `import bnjax` loads none of the program's packages,
the wheel ships only `bnjax`, and the program finds its configs from any directory."""

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bnjax_train.config_lib import load_config

REPO = Path(__file__).resolve().parents[1]
PROGRAM_ONLY = ("orbax", "tensorflow_datasets", "matplotlib", "mnist1d", "tqdm", "sklearn",
                "ml_collections", "bnjax_train", "benchmarks", "tensorflow", "scipy")


def _modules_after(code, cwd):
    """Top-level module names loaded by a fresh interpreter after running ``code``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\n"
         "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_import_bnjax_loads_no_program_dependency(tmp_path):
    loaded = _modules_after("import bnjax, bnjax.nnx, bnjax.swap, bnjax.timing, bnjax.benchmark",
                            tmp_path)
    assert "bnjax" in loaded
    assert not loaded & set(PROGRAM_ONLY), sorted(loaded & set(PROGRAM_ONLY))
    # Flax and optax import absl themselves; bnjax may bring nothing beyond them.
    baseline = _modules_after("import flax.linen, flax.nnx, optax", tmp_path)
    if "absl" not in baseline:
        assert "absl" not in loaded
    assert loaded - baseline <= {"bnjax"} | (loaded & set(sys.stdlib_module_names)), \
        sorted(loaded - baseline - set(sys.stdlib_module_names))


def test_wheel_ships_the_library_with_the_library_dependencies_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
            for d in project["project"]["dependencies"]}
    assert deps == {"jax", "flax", "optax", "numpy"}
    find = project["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["bnjax", "bnjax.*"]
    train = " ".join(project["project"]["optional-dependencies"]["train"])
    for name in ("orbax-checkpoint", "ml_collections", "mnist1d", "tensorflow-datasets",
                 "importlib_resources", "absl-py", "scikit-learn"):
        assert name in train, name
    assert project["project"]["license"] == "Apache-2.0"


@pytest.mark.parametrize("name", ["default", "configs/tiny.py", "tiny"])
def test_load_config_works_from_another_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    config = load_config(name)
    assert config.dataset == "mnist1d"
    assert config.num_epochs == (20 if name == "default" else 2)


def test_load_config_of_a_missing_file_names_what_it_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config file 'nope' not found"):
        load_config("nope")


_BENCHMARKS_IMPORT = re.compile(r"^\s*(?:>>>|\.\.\.)?\s*(?:from\s+benchmarks(?:\.|\s)|import\s+"
                                r"benchmarks\b)", re.M)


def test_no_program_module_imports_benchmarks():
    """The program never climbs back up into the benchmarks: not in code, not in examples."""
    offenders = []
    for path in sorted((REPO / "bnjax_train").rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n == "benchmarks" or n.startswith("benchmarks.")]
        offenders += [f"{path.relative_to(REPO)}: docstring example {m.group().strip()!r}"
                      for m in _BENCHMARKS_IMPORT.finditer(source) if ">>>" in m.group()]
    assert not offenders, offenders
    # And a fresh interpreter that imports every module of the program loads no benchmarks.
    loaded = _modules_after(
        "import pkgutil, importlib, bnjax_train\n"
        "for m in pkgutil.walk_packages(bnjax_train.__path__, 'bnjax_train.'):\n"
        "    importlib.import_module(m.name) if not m.name.endswith('__main__') else None",
        REPO)
    assert "benchmarks" not in loaded
