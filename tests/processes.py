"""Test subprocesses bounded in time and always ended.

Every JAX process of the program's tests (this one and the ``python train.py`` children)
compiles through the session's persistent XLA cache (set up by ``conftest.py``).
"""

import os
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a child with ``devices`` CPU devices and the suite's compiler flags."""
    return " ".join(f for f in (os.environ.get("BNJAX_TEST_XLA_FLAGS", ""),
                                f"--xla_force_host_platform_device_count={devices}") if f)


def one_device_env(**extra):
    """The environment for a subprocess that needs one CPU device (compiles much less than 8).

    conftest.py gives this process 8 forced CPU devices through XLA_FLAGS; a child that does not
    test several devices gets one, and the repository root on its path.
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               XLA_FLAGS=xla_flags(1), **extra)
    return env
