"""Every public name has a docstring with a runnable example, and the examples run."""

import dataclasses
import doctest
import importlib
import inspect
import pkgutil

import pytest

import bnjax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(bnjax.__path__, "bnjax.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"


def _public_callables():
    """Public functions and classes defined in each bnjax module (``__all__`` where given)."""
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
