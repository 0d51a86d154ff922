"""Test set-up: 8 CPU devices for the synchronized-statistics tests (before JAX starts)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture
def keras():
    """Keras 3 on the JAX backend, the second library the parity tests compare against."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras as keras_module

    if keras_module.backend.backend() != "jax":
        pytest.fail("Keras was imported with another backend; set KERAS_BACKEND=jax")
    return keras_module


def pytest_collection_modifyitems(config, items):
    """Tests sharing an expensive module-scoped fixture run on one xdist worker.

    With ``--dist loadgroup`` (pyproject's addopts) each group goes to one worker, so a
    module fixture (a quick training run, a quick study) is built once instead of once per
    worker; every other test is still spread over the workers.
    """
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        if defs is None:
            continue
        # Autouse module fixtures (a compilation cache) are cheap: they don't group a module.
        if any(d.scope == "module" and not getattr(d, "_autouse", False)
               for fixturedefs in defs.name2fixturedefs.values() for d in fixturedefs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
