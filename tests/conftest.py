"""Test set-up: 8 CPU devices for the synchronized-statistics tests (before JAX starts)."""

import os
import subprocess
import sys

# Compile time is most of this suite's time: XLA's LLVM optimizations cost more to compile
# than they save on test-sized programs. This changes code generation only, not the HLO that
# XLA optimizes and fuses (tests/test_hlo.py reads it); the processes the tests start
# inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "BNJAX_TEST_XLA_FLAGS" not in os.environ:
    # The programs the tests start (train.py runs, quick studies and benchmarks) also use
    # XLA:CPU's legacy emitters, cheaper still to compile (caches.fast_compile_env,
    # processes.xla_flags); this process keeps the default emitters, whose rounding the
    # tight trajectory comparisons here were written against. XLA aborts on a flag it does
    # not know, so the switch is used only where this jaxlib has it: probed once, and xdist
    # workers inherit the answer.
    _FLAG = "--xla_cpu_use_fusion_emitters=false"
    _probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"],
                            env={**os.environ, "XLA_FLAGS": _FLAG, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, timeout=300)
    os.environ["BNJAX_TEST_XLA_FLAGS"] = _FLAG if _probe.returncode == 0 else ""
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache for the session (xdist workers inherit it): tests
    # that build the same program anew (a new closure, a new module of the same shapes)
    # load it instead of compiling it again. Removed at the end by the process that made it.
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="bnjax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
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
