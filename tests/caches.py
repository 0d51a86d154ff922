"""Compilation caches and folders that the tests of one session share.

A persistent JAX compilation cache keeps compiled programs only: what a run computes, prints
and writes is unchanged, but a program that was compiled before (in this process or, for the
benchmark subprocesses, in another one of the session) is loaded instead of compiled again.
"""

import contextlib
import os
from pathlib import Path


def session_dir(tmp_path_factory, name: str) -> Path:
    """``name`` in the session's temporary folder, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is below the session's
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


#: XLA flag of the benchmark smoke tests: no LLVM optimization of the compiled code, which
#: roughly halves their compile times. Their figures mean nothing anyway (``--quick``,
#: ``--dry-run``, the tiny training config), and what they check (the tables, the JSON,
#: folded against unfolded outputs to 1e-5) does not depend on it.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def smoke_test_env(tmp_path_factory, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a benchmark smoke-test subprocess: the session's compilation cache and
    :data:`FAST_COMPILE` (added to its ``XLA_FLAGS``).

    Every benchmark subprocess of the session reads and writes the cache: the quick step
    benchmark and the GPU check's dry run compile the same op and model steps, the
    ``parallel`` quick run the ``sync`` one's pmap steps, a second training run the first
    one's steps.
    """
    flags = " ".join(f for f in (env.get("XLA_FLAGS", ""), FAST_COMPILE) if f)
    cache = session_dir(tmp_path_factory, "bnjax_bench_cache")
    return {**env, "XLA_FLAGS": flags, "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@contextlib.contextmanager
def compile_cache(path):
    """This process's persistent JAX compilation cache in ``path`` while active.

    Programs with the same computation (e.g. the same model compiled again by another call
    of a tool that jits a new closure each time) are then compiled once.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    try:
        yield path
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        compilation_cache.reset_cache()
