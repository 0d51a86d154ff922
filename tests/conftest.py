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
