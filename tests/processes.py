"""Test subprocesses bounded in time and always ended; the compilation cache they share.

Every JAX process of the program's tests (this one and the ``python train.py`` children)
compiles through one persistent XLA cache per session (per xdist worker): a step that another
test or child already compiled is read back instead of compiled again. Compiled programs are
keyed by their HLO, devices and flags, so a hit runs exactly what a compile would have made.
"""

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_dir(tmp_path_factory) -> str:
    """The persistent XLA compilation cache of this session (of this xdist worker)."""
    return str(tmp_path_factory.getbasetemp() / "bnjax_jax_cache")


def cache_env(cache: str) -> dict[str, str]:
    """The environment variables that make a child JAX process compile through ``cache``.

    Every compilation is kept (JAX keeps only those over 1 s by default).
    """
    return {"JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@contextlib.contextmanager
def compilation_cache(cache: str) -> Iterator[str]:
    """Within the block, this process's compilations go through the persistent ``cache`` too."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax_cache.reset_cache()
    try:
        yield cache
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        jax_cache.reset_cache()


def run_processes(commands: list[tuple[list[str], dict]], log_dir: Path,
                  timeout: float) -> tuple[list[int | None], list[str]]:
    """Runs ``(argv, env)`` commands side by side; kills whatever is left after ``timeout`` s.

    Returns each process's exit code (negative when killed) and its combined output.
    """
    procs, logs = [], []
    try:
        for i, (argv, env) in enumerate(commands):
            log = open(log_dir / f"process_{i}.log", "w+")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    return [p.returncode for p in procs], texts


def one_device_env(**extra):
    """The environment for a subprocess that needs one CPU device (compiles much less than 8).

    conftest.py gives this process 8 forced CPU devices through XLA_FLAGS; a child that does not
    test several devices gets one, and the repository root on its path.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               **extra)
    return env
