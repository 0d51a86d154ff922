"""Compiler settings and folders that the tests of one session share.

The session's persistent JAX compilation cache is set up by conftest.py
(``JAX_COMPILATION_CACHE_DIR``): this process and every process it starts with its
environment compile through it. It keeps compiled programs only: what a run computes, prints
and writes is unchanged, but a program compiled before (in this process, or in another
process of the session: the ``python train.py`` children, the benchmark subprocesses) is
loaded instead of compiled again. Compiled programs are keyed by their HLO, devices and flags,
so a hit runs exactly what a compile would have made.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def session_dir(tmp_path_factory, name: str) -> Path:
    """``name`` in the session's temporary folder, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is below the session's
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str) -> Iterator[Path]:
    """``name`` in a folder every xdist worker of this session shares, held exclusively.

    The first worker to get there makes the folder's contents; the others wait, then read
    them. Without ``fcntl`` (no POSIX locks) each worker gets a folder of its own.
    """
    try:
        import fcntl
    except ImportError:
        yield tmp_path_factory.getbasetemp() / name
        return
    base = session_dir(tmp_path_factory, "bnjax_shared")
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield base / name
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def fast_compile_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the suite's cheap-compilation settings (see conftest.py), for a child.

    The quick studies, ``--quick`` benchmarks and the GPU check's dry run are tiny: compiling
    is most of their time. Only the compiler's code generation changes, not what the command
    runs; what the tests check of them (tables recomputed from the JSON, folded against
    unfolded outputs to 1e-5, verdict lines) does not depend on it.
    """
    flags = " ".join(f for f in (env.get("XLA_FLAGS", ""),
                                 os.environ.get("BNJAX_TEST_XLA_FLAGS", "")) if f)
    return {**env, "XLA_FLAGS": flags, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
