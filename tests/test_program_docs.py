"""The program's and the benchmarks' docstring examples run and leave no temporary files.

(`tests/test_docs.py` does the same for the library, `bnjax`.) The examples run with
`tempfile`'s folder pointed at an empty one, which must be empty again afterwards.
"""

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
import tempfile

import pytest

import benchmarks
import bnjax_train

MODULES = sorted(
    m.name for package, prefix in ((bnjax_train, "bnjax_train."), (benchmarks, "benchmarks."))
    for m in pkgutil.walk_packages(package.__path__, prefix)
    if not m.name.endswith("__main__")
) + ["benchmarks", "bnjax_train"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass_and_clean_up(name, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)  # examples that write relative paths would show up here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"], list(tmp_path.iterdir())
    assert not list(scratch.iterdir()), f"{name}'s examples left {list(scratch.iterdir())}"


def _public_callables():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [
            n for n in vars(module) if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module_name:
                yield f"{module_name}.{name}", obj


@pytest.mark.parametrize("name,obj", list(_public_callables()))
def test_public_api_has_docstring_with_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if inspect.isclass(obj) and (issubclass(obj, tuple | Exception)
                                 or dataclasses.is_dataclass(obj)):  # records and errors
        return
    assert ">>>" in doc, f"{name}'s docstring has no runnable example"
