"""Flax's own BatchNorm tests, run with bnjax in place of Flax's layers.

The files under ``tests/fixtures/flax_tests/`` are Flax's published test files at v0.12.7
(see ``tests/fixtures/README.md``), unedited. The tests collected are those whose source names
``BatchNorm`` (80). Each runs two ways:

- **swap**: the unchanged test under ``bnjax.replacing_flax_batch_norm()`` (every
  ``flax.linen.BatchNorm`` call runs ``bnjax.BatchNorm``), with the test module's ``nnx``
  name bound to a view of ``flax.nnx`` whose ``BatchNorm`` builds a ``flax.nnx.BatchNorm`` and
  hands it at once to ``bnjax.replace_nnx_batch_norm`` (the NNX swap replaces layers in place
  after construction; the tests use their layers as soon as they are built, so the swap is
  applied at construction). Everything else in ``flax.nnx`` is Flax's own.
- **port**: the text replacement a user makes, ``nnx.BatchNorm`` -> ``bnjax.nnx.BatchNorm``
  and ``nn.BatchNorm`` -> ``bnjax.BatchNorm``, with Flax's epsilon 1e-5 given (the ported
  name is bound to the bnjax class with ``epsilon=1e-5`` as a ``functools.partial``: an
  explicit epsilon in a call still wins). ``linen.BatchNorm`` in the NNX-vs-Linen
  consistency tests is Flax's reference and stays.

One narrow transformation, only in the port and only inside the two NNX-vs-Linen
consistency tests (:data:`RELAXED`), which assert bit equality between Flax's Linen layer and
the (ported) NNX layer: ``np.testing.assert_array_equal(flax, ours)`` is read as agreement
to 1e-6 (relative and absolute), and where Flax's value is NaN (its answer for features that
the mask leaves without any value) bnjax's must be finite instead.

The full set takes minutes on CPU (``-m slow``); the default run keeps a representative
subset (:data:`FAST`): complex inputs, ``bind`` on a rank-1 input, NNX ensembles on batches
of one under ``nnx.vmap`` and ``nnx.scan``, a cross-axis ``nn.vmap``, and the masked
NNX-vs-Linen comparison.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import os
import re
import sys
import types
import unittest
import warnings
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import bnjax
import bnjax.nnx

FIXTURES = Path(__file__).parent / "fixtures" / "flax_tests"
#: The vendored files and the git blobs of Flax's published files at v0.12.7.
BLOBS = {
    "linen_linen_test_v0127.py": "14cf759be1987332bf354427891be17a0db653bf",
    "linen_linen_module_test_v0127.py": "c9d4ee646cd761d9b3129b5ec55e858fde23b967",
    "linen_linen_transforms_test_v0127.py": "8d9edb9461648bccb041db08ec6c5e5f630ab036",
    "nnx_transforms_test_v0127.py": "f1f5867e85e50a38f1da24f7d28b775e763cda41",
    "nnx_integration_test_v0127.py": "433b4ea844cfe4d345902f1ba4fd2c9d4598dac1",
    "nnx_nn_normalization_test_v0127.py": "7766252da50f5677a11b8b320e6c5d7e33df05fc",
}
FILES = tuple(BLOBS)
FLAX_EPSILON = 1e-5
#: (file, test function) whose bit-equality assertions the port reads as 1e-6.
RELAXED = {
    ("nnx_nn_normalization_test_v0127.py", "test_nnx_linen_batchnorm_equivalence"),
    ("nnx_nn_normalization_test_v0127.py", "test_nnx_linen_spectralnorm_equivalence"),
}
#: The default run's subset: (file, class, method).
FAST = {
    ("linen_linen_test_v0127.py", "NormalizationTest", "test_batch_norm_complex0"),
    ("linen_linen_test_v0127.py", "NormalizationTest", "test_batch_norm_complex1"),
    ("linen_linen_module_test_v0127.py", "ModuleTest", "test_bind_stateful"),
    ("linen_linen_transforms_test_v0127.py", "TransformTest", "test_vmap_batchnorm"),
    ("nnx_transforms_test_v0127.py", "TestVmap", "test_state_axes_super_simple0"),
    ("nnx_transforms_test_v0127.py", "TestScan", "test_complex"),
    ("nnx_nn_normalization_test_v0127.py", "TestLinenConsistency",
     "test_nnx_linen_batchnorm_equivalence1"),
}


def assert_close_to_flax(expected: object, actual: object) -> None:
    """Flax's ``expected`` and bnjax's ``actual`` agree to 1e-6; Flax's NaN means finite."""
    e = np.asarray(expected).astype(np.complex128)
    a = np.asarray(actual).astype(np.complex128)
    assert e.shape == a.shape, (e.shape, a.shape)
    nan = np.isnan(e)
    assert np.isfinite(a[nan]).all(), "bnjax answered non-finite where Flax answers NaN"
    np.testing.assert_allclose(a[~nan], e[~nan], rtol=1e-6, atol=1e-6)


def port_source(source: str) -> str:
    """The text replacement of a port: Flax's BatchNorm names become bnjax's."""
    source = re.sub(r"\bnnx\.BatchNorm\b", "bnjax.nnx.BatchNorm", source)
    return re.sub(r"\bnn\.BatchNorm\b", "bnjax.BatchNorm", source)


def relax_source(name: str, source: str) -> str:
    """``np.testing.assert_array_equal`` -> the 1e-6 reading, inside :data:`RELAXED` only."""
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and (name, node.name) in RELAXED:
            for i in range(node.lineno - 1, node.end_lineno):
                lines[i] = lines[i].replace("np.testing.assert_array_equal(",
                                            "assert_close_to_flax(")
    return "".join(lines)


def _ported_bnjax() -> types.SimpleNamespace:
    """The ``bnjax`` the ported source sees: bnjax's classes with Flax's epsilon given."""
    return types.SimpleNamespace(
        BatchNorm=functools.partial(bnjax.BatchNorm, epsilon=FLAX_EPSILON),
        nnx=types.SimpleNamespace(
            BatchNorm=functools.partial(bnjax.nnx.BatchNorm, epsilon=FLAX_EPSILON)))


class _Holder(nnx.Module):
    """A parent for one freshly built layer, so that the in-place NNX swap can replace it."""


def _swapped_nnx() -> types.ModuleType:
    """``flax.nnx`` with ``BatchNorm`` swapped at construction (see the module docstring)."""
    view = types.ModuleType("flax.nnx (BatchNorm swapped)")
    view.__getattr__ = lambda name: getattr(nnx, name)

    def batch_norm(*args: object, **kwargs: object) -> bnjax.nnx.BatchNorm:
        holder = _Holder()
        holder.layer = nnx.BatchNorm(*args, **kwargs)
        assert bnjax.replace_nnx_batch_norm(holder).count == 1
        return holder.layer

    view.BatchNorm = batch_norm
    return view


@functools.cache
def load(name: str, mode: str) -> types.ModuleType:
    """Flax's test file ``name`` as a module: ``"flax"`` (as published), swap or port."""
    source = (FIXTURES / name).read_text()
    module = types.ModuleType(f"flax_suite_{mode}_{name[:-3]}")
    module.__file__ = str(FIXTURES / name)
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    if mode == "port":
        source = relax_source(name, port_source(source))
        module.bnjax = _ported_bnjax()
        module.assert_close_to_flax = assert_close_to_flax
    environ = dict(os.environ)  # nnx_transforms_test sets XLA_FLAGS at import
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    finally:
        os.environ.clear()
        os.environ.update(environ)
    if mode == "swap" and "nnx" in module.__dict__:
        module.nnx = _swapped_nnx()
    return module


def batch_norm_tests(name: str) -> list[tuple[str, str]]:
    """``(class, method)`` of the tests of ``name`` whose source names BatchNorm."""
    module = load(name, "flax")
    found = []
    for cls_name, cls in vars(module).items():
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)
                and cls.__module__ == module.__name__):
            continue
        for method in unittest.TestLoader().getTestCaseNames(cls):
            if "BatchNorm" in inspect.getsource(getattr(cls, method)):
                found.append((cls_name, method))
    return found


ALL = [(name, *test) for name in FILES for test in batch_norm_tests(name)]


def run_flax_test(name: str, cls_name: str, method: str, mode: str) -> None:
    """Runs one of Flax's tests (absltest) in ``mode``; fails with its traceback."""
    module = load(name, mode)
    case = getattr(module, cls_name)(method)
    result = unittest.TestResult()
    swap = bnjax.replacing_flax_batch_norm() if mode == "swap" else contextlib.nullcontext()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bnjax.SingleValueWarning)
        with swap:
            case.run(result)
    problems = result.errors + result.failures
    if problems:
        pytest.fail("".join(text for _, text in problems), pytrace=False)
    if result.skipped:
        pytest.skip(result.skipped[0][1])


def _params(selected: bool) -> list:
    marks = () if selected else (pytest.mark.slow,)
    return [pytest.param(*t, marks=marks, id="::".join(t)) for t in ALL
            if (t in FAST) == selected]


@pytest.mark.parametrize("name", FILES)
def test_vendored_files_are_flax_published_text(name):
    data = (FIXTURES / name).read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's id
    assert blob == BLOBS[name]


def test_collects_flax_batch_norm_tests():
    assert len(ALL) == 80
    assert FAST <= set(ALL)


@pytest.mark.parametrize("mode", ["swap", "port"])
@pytest.mark.parametrize(("name", "cls_name", "method"), _params(True) + _params(False))
def test_flax_batch_norm_test_passes(name, cls_name, method, mode):
    run_flax_test(name, cls_name, method, mode)


def test_port_is_a_text_replacement():
    source = "nn.BatchNorm(x); nnx.BatchNorm(3, rngs=r); linen.BatchNorm(); bnn.BatchNormX"
    assert port_source(source) == ("bnjax.BatchNorm(x); bnjax.nnx.BatchNorm(3, rngs=r); "
                                   "linen.BatchNorm(); bnn.BatchNormX")


def test_relaxation_is_narrow():
    name = "nnx_nn_normalization_test_v0127.py"
    source = (FIXTURES / name).read_text()
    relaxed = relax_source(name, source)
    changed = [a for a, b in zip(source.splitlines(), relaxed.splitlines(), strict=True)
               if a != b]
    inside = sum(ast.get_source_segment(source, node).count("np.testing.assert_array_equal(")
                 for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.FunctionDef) and (name, node.name) in RELAXED)
    assert len(changed) == inside == 8
    assert source.count("np.testing.assert_array_equal(") > inside  # the rest stay exact
    assert relax_source("linen_linen_test_v0127.py", source) == source


def test_assert_close_to_flax_is_strict_where_flax_is_finite():
    assert_close_to_flax([1.0, np.nan], [1.0 + 5e-7, 0.0])
    with pytest.raises(AssertionError):
        assert_close_to_flax([1.0, 2.0], [1.0, 2.0 + 1e-4])
    with pytest.raises(AssertionError):
        assert_close_to_flax([np.nan], [np.nan])
